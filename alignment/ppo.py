"""PPO for language models (RLHF): the SFT policy samples answers, a reward scores them, the policy moves toward
higher reward while a KL penalty keeps it near the SFT model. TRL 1.x no longer ships PPO; this is ours, built on
alignment/rl.py (the per-token maths) and tiny_hf's inference engine (the rollouts).

    python alignment/ppo.py --model runs/sft --reward-fn exact_match --task verifiable --out runs/ppo
    python alignment/ppo.py --model runs/sft --reward-model runs/reward --task docs --out runs/ppo-rm
    python alignment/ppo.py --model runs/sft --reward-model runs/reward --reward-fn exact_match --lora
    python alignment/ppo.py ... --out runs/ppo --resume                       # continue from the last checkpoint

One PPO step (Ziegler et al. 2019; Ouyang et al. 2022; the details of Huang et al. 2024):
1. rollout: a batch of prompts (chat template + generation prompt) is sampled at --temperature by tiny_hf's engine
   (prefix cache off: cached prompt KV would be stale after an update; a PEFT policy runs as its base model with the
   adapters injected and active; models the engine cannot run fall back to `generate()`), with a seed per request, so
   a step's samples are a function of the weights and the step alone; responses are cut after the stop token (the
   chat template's turn end, `<|im_end|>` for tiny_hf tokenizers).
2. score: a reward model on the chat-formatted prompt + response text (re-tokenized with the reward model's own
   tokenizer, so its vocabulary need not match the policy's) and/or Python reward functions (TRL's signature), summed;
   `--missing-eos-penalty` replaces the score of responses that never ended.
3. per-token rewards: -kl_coef * KL(policy || reference) on every response token, plus the score on the last one;
   the coefficient is fixed or adaptive (`--target-kl`).
4. advantages: GAE(gamma, lambda) over the response tokens, whitened over the batch.
5. update: --ppo-epochs passes over shuffled minibatches, clipped surrogate + vf_coef x clipped value loss, gradient
   clipping. Dropout stays off (eval mode) throughout: with it the ratio is not 1 before the first update.

The reference is a frozen copy of the SFT model, or with `--lora` the same network with its adapters disabled. Each
step logs score, KL, entropy, clip fraction, approx KL, value loss, explained variance, response length and the
seconds spent in rollout/scoring/update to metrics.jsonl, TensorBoard (tb/) and the progress bar; checkpoints
(policy, value head, optimizer, RNG, step, KL coefficient) are written atomically, the last K kept, and `--resume`
continues so that, on one CPU process, the following steps log the same numbers as an uninterrupted run. At the end
the policy is exported to <out>/model (merged if LoRA; tiny models so that they load without tiny_hf) and
summary.json holds first/last score and KL.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf  # registers the Auto classes
from alignment.data import exact_match_reward, partial_credit_reward
from alignment.rl import (
    KL_ESTIMATORS,
    VALUE_HEAD_FILE,
    AdaptiveKLController,
    FixedKLController,
    ValueHeadModel,
    eos_penalty,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_mean,
    policy_forward,
    policy_loss,
    truncate_response,
    value_loss,
    whiten,
)
from tiny_hf.engine import Engine, SamplingParams
from tiny_hf.runs import model_path
from training.pretrain import global_batch_indices, latest_checkpoint, rng_state, set_rng_state

TASKS = ("verifiable", "docs")
# Reward functions by name, TRL's signature: fn(prompts=..., completions=..., completion_ids=..., **columns) -> floats.
# `--reward-fn` also takes "package.module:function".
REWARD_FUNCTIONS: dict[str, Callable] = {"exact_match": exact_match_reward, "partial_credit": partial_credit_reward}
TURN_END = "<|im_end|>"  # where a ChatML assistant turn ends: the stop token when the tokenizer has it
# Metrics compared between an interrupted and a resumed run: everything but wall-clock seconds.
TIMING_KEYS = ("rollout_s", "scoring_s", "update_s")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="runs/sft", help="the SFT run (a run folder or a model folder)")
    model.add_argument("--lora", action="store_true", help="train LoRA adapters (+ the value head); reference = base")
    model.add_argument("--rank", type=int, default=16, help="LoRA rank")
    model.add_argument("--stop-token", default=None, help=f"ends a response (default: {TURN_END} if known, else eos)")
    model.add_argument("--trust-remote-code", action="store_true")
    reward = parser.add_argument_group("reward")
    reward.add_argument("--reward-model", default=None, help="a reward run/model folder (alignment/reward.py)")
    reward.add_argument(
        "--reward-fn",
        action="append",
        default=[],
        help=f"one of {sorted(REWARD_FUNCTIONS)} or package.module:function; repeatable",
    )
    reward.add_argument("--reward-max-length", type=int, default=512, help="tokens the reward model reads")
    reward.add_argument(
        "--missing-eos-penalty",
        type=float,
        default=None,
        help="score of a response that never emits the stop token (default: keep it)",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--task", default="verifiable", help=f"one of {list(TASKS)} or a local prompt .jsonl")
    data.add_argument("--max-examples", type=int, default=None, help="use a fixed subset of the prompts")
    rollout = parser.add_argument_group("rollout")
    rollout.add_argument("--batch-size", type=int, default=16, help="prompts (episodes) per PPO step")
    rollout.add_argument("--max-new-tokens", type=int, default=32)
    rollout.add_argument("--temperature", type=float, default=0.7, help="sampling and training temperature")
    ppo = parser.add_argument_group("PPO")
    ppo.add_argument("--max-steps", type=int, default=200)
    ppo.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout batch")
    ppo.add_argument("--minibatch-size", type=int, default=8, help="episodes per gradient step")
    ppo.add_argument("--lr", type=float, default=1e-5)
    ppo.add_argument("--clip-range", type=float, default=0.2, help="epsilon of the clipped surrogate")
    ppo.add_argument("--clip-range-value", type=float, default=0.2, help="epsilon of the clipped value loss")
    ppo.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    ppo.add_argument("--gamma", type=float, default=1.0)
    ppo.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    ppo.add_argument("--max-grad-norm", type=float, default=1.0)
    kl = parser.add_argument_group("KL penalty")
    kl.add_argument("--kl-coef", type=float, default=0.05, help="beta (the start value when adaptive)")
    kl.add_argument("--kl-estimator", choices=sorted(KL_ESTIMATORS), default="k1")
    kl.add_argument("--target-kl", type=float, default=None, help="adaptive beta aiming at this KL per sequence")
    kl.add_argument("--kl-horizon", type=float, default=10000, help="adaptive controller horizon (episodes)")
    out = parser.add_argument_group("output and checkpoints")
    out.add_argument("--out", type=Path, default=Path("runs/ppo"))
    out.add_argument("--save-every", type=int, default=50)
    out.add_argument("--keep-last", type=int, default=2)
    out.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    out.add_argument("--no-progress", action="store_true")
    system = parser.add_argument_group("system")
    system.add_argument("--seed", type=int, default=0)
    system.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Checks: everything that would otherwise fail (or silently train on nonsense) after minutes, before anything loads.
# ---------------------------------------------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    for name in (
        "batch_size",
        "max_new_tokens",
        "max_steps",
        "ppo_epochs",
        "minibatch_size",
        "save_every",
        "keep_last",
        "rank",
        "reward_max_length",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.minibatch_size > args.batch_size:
        raise ValueError(f"--minibatch-size={args.minibatch_size} is larger than --batch-size={args.batch_size}")
    if not args.kl_coef >= 0:
        raise ValueError(
            f"--kl-coef={args.kl_coef} must be >= 0 (a negative coefficient rewards drifting from the reference)"
        )
    for name in ("clip_range", "clip_range_value", "temperature", "lr", "max_grad_norm", "kl_horizon"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if args.target_kl is not None and not args.target_kl > 0:
        raise ValueError(f"--target-kl={args.target_kl} must be > 0")
    if not args.vf_coef >= 0:
        raise ValueError(f"--vf-coef={args.vf_coef} must be >= 0")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be in [0, 1]")
    if args.reward_model is None and not args.reward_fn:
        raise ValueError("no reward: pass --reward-model DIR and/or --reward-fn NAME")
    for spec in args.reward_fn:
        load_reward_fn(spec)
    if args.task not in TASKS and not Path(args.task).is_file():
        raise ValueError(f"--task {args.task!r} is not one of {list(TASKS)} nor an existing prompt .jsonl file")


def load_reward_fn(spec: str) -> Callable:
    """A reward function by name (REWARD_FUNCTIONS) or as "package.module:function"."""
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--reward-fn {spec!r}: {error}") from None
    raise ValueError(f"--reward-fn {spec!r} is not one of {sorted(REWARD_FUNCTIONS)} nor package.module:function")


def stop_token_id(tokenizer, name: str | None) -> int:
    """The token that ends a response: --stop-token, else the chat template's turn end, else eos."""
    token = name or (TURN_END if TURN_END in tokenizer.get_vocab() else tokenizer.eos_token)
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(f"stop token {token!r} is not in the policy's vocabulary: pass --stop-token")
    return token_id


def check_tokenizer(tokenizer, stop_id: int, what: str) -> None:
    if tokenizer.chat_template is None:
        raise ValueError(f"{what}: the tokenizer has no chat template to format the prompts with")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError(f"{what}: the tokenizer has no pad token, which batching rollouts needs")
    if pad in (stop_id, tokenizer.eos_token_id):
        raise ValueError(
            f"{what}: pad_token_id == eos_token_id ({pad}): padding cannot be told from the end of a response; "
            "use a tokenizer with a separate pad token"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Data: prompts in TRL's conversational format, with the other columns kept for the reward functions.
# ---------------------------------------------------------------------------------------------------------------------
def load_prompts(task: str, max_examples: int | None, stdlib_dir: str | None = None) -> list[dict]:
    """Rows with `prompt` (a list of chat turns) plus whatever else the source has (`answer` for exact_match).
    `stdlib_dir` builds the embedded tasks from another standard-library folder (tests)."""
    if task == "verifiable":
        from alignment.data import verifiable_dataset

        rows = list(verifiable_dataset(max_examples=max_examples, stdlib_dir=stdlib_dir)["train"])
    elif task == "docs":
        from alignment.data import preference_dataset

        data = preference_dataset(max_examples=max_examples, stdlib_dir=stdlib_dir)["train"]
        rows = [{"prompt": r["prompt"], "id": r["id"]} for r in data]
    else:
        rows = []
        for i, line in enumerate(Path(task).read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if not row.get("prompt"):
                raise ValueError(f"--task {task}: line {i + 1} has no 'prompt' (a string or a list of chat turns)")
            if isinstance(row["prompt"], str):
                row["prompt"] = [{"role": "user", "content": row["prompt"]}]
            rows.append(row)
        rows = rows[:max_examples] if max_examples is not None else rows
    if not rows:
        raise ValueError(f"--task {task}: no prompts")
    return rows


def request_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + index) % (2**63)


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------------------
def engine_model(policy):
    """The causal LM the engine runs: the policy itself, or a PEFT model's base, whose layers carry the injected
    (active) LoRA modules. None when the engine cannot run it (not a TinyForCausalLM-style model)."""
    lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    ok = all(hasattr(getattr(lm, "model", None), n) for n in ("embed_tokens", "add_positions", "layers", "norm"))
    return lm if ok and hasattr(lm, "lm_head") else None


def make_engine(policy, tokenizer, batch_size: int) -> Engine | None:
    """One engine for the whole run, or None for models it cannot run (they use `generate()`). Reusing it across
    updates is safe because nothing in it outlives a request except the prefix cache, which is off: cached prompt KV
    would come from the weights before the last update. (Its CUDA graphs read the parameters in place, and the
    optimizer updates them in place.)"""
    lm = engine_model(policy)
    return None if lm is None else Engine(lm, tokenizer, max_batch_size=batch_size, prefix_cache_tokens=0)


def generate_responses(
    policy,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    stop_id: int,
    seeds: list[int],
    engine: Engine | None = None,
) -> list[list[int]]:
    """Sample one response per prompt (token ids, the stop token included when emitted), through `engine` when given,
    with a seed per request, so a response does not depend on the batch it ran in. Without an engine (models it
    cannot run, e.g. a stock transformers LM), `generate()` with left padding and a forked RNG seeded by `seeds[0]`."""
    if engine is not None:
        # Only the stop token ends a response (ignore_eos): truncate_response cuts at that one id.
        params = [
            SamplingParams(
                max_tokens=max_new_tokens, temperature=temperature, stop_token_ids=[stop_id], ignore_eos=True, seed=s
            )
            for s in seeds
        ]
        return [c.token_ids for c in engine.generate(prompt_ids, params)]
    device = next(policy.parameters()).device
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):  # left padding: generation continues every row at the same column
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seeds[0])
        out = policy.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    responses = []
    for row in out[:, width:].tolist():
        cut = row.index(stop_id) + 1 if stop_id in row else len(row)
        responses.append(row[:cut])
    return responses


def build_batch(prompt_ids: list[list[int]], responses: list[list[int]], stop_id: int, pad_id: int):
    """Right-padded (prompt + response) rows: input_ids, attention_mask, response_mask (B, T) and ended (B,)."""
    empty = [i for i, r in enumerate(responses) if not r]
    if empty:
        raise RuntimeError(
            f"rollouts {empty} produced no tokens: nothing to score or train on (check --max-new-tokens and that "
            "prompts leave room in the context window)"
        )
    width_r = max(len(r) for r in responses)
    resp = torch.full((len(responses), width_r), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r)
    resp, keep, ended = truncate_response(resp, stop_id, pad_id)
    lengths = [min(len(r), int(k.sum())) for r, k in zip(responses, keep, strict=True)]
    width = max(len(p) + n for p, n in zip(prompt_ids, lengths, strict=True))
    input_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, n) in enumerate(zip(prompt_ids, lengths, strict=True)):
        input_ids[i, : len(p)] = torch.tensor(p)
        input_ids[i, len(p) : len(p) + n] = resp[i, :n]
        attention_mask[i, : len(p) + n] = 1
        response_mask[i, len(p) : len(p) + n] = True
    return input_ids, attention_mask, response_mask, ended


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------
def response_texts(tokenizer, responses: list[list[int]], stop_id: int) -> list[str]:
    """The text of each response, without its stop token."""
    return [tokenizer.decode([t for t in r if t != stop_id], skip_special_tokens=True) for r in responses]


@torch.no_grad()
def reward_model_scores(model, tokenizer, conversations: list[list[dict]], max_length: int) -> torch.Tensor:
    """The reward model's score (N,) of each conversation, tokenized with its own tokenizer (reward.rewards)."""
    from alignment.reward import rewards

    return rewards(model, tokenizer, conversations, max_length)


def score(
    rows: list[dict],
    texts: list[str],
    responses: list[list[int]],
    *,
    reward_fns: list[Callable],
    reward_model=None,
    reward_tokenizer=None,
    reward_max_length: int = 512,
) -> torch.Tensor:
    """The summed score (B,) of each response: reward model on the chat-formatted text, plus each reward function."""
    prompts = [r["prompt"] for r in rows]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    total = torch.zeros(len(rows))
    if reward_model is not None:
        conversations = [p + c for p, c in zip(prompts, completions, strict=True)]
        total += reward_model_scores(reward_model, reward_tokenizer, conversations, reward_max_length)
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
    for fn in reward_fns:
        values = fn(prompts=prompts, completions=completions, completion_ids=responses, **columns)
        values = torch.tensor([math.nan if v is None else float(v) for v in values])
        if values.shape != total.shape or not torch.isfinite(values).all():
            raise ValueError(
                f"reward function {getattr(fn, '__name__', fn)} returned {values.tolist()}: "
                f"expected {len(rows)} finite numbers"
            )
        total += values
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Model, checkpoints, export
# ---------------------------------------------------------------------------------------------------------------------
def build_policy(path: str, args: argparse.Namespace, device: torch.device):
    """(ValueHeadModel, reference or None): LoRA policies use their own base (adapters disabled) as the reference."""
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    reference = None
    if args.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
        lm = get_peft_model(lm, config)
    else:
        reference = copy.deepcopy(lm).eval().requires_grad_(False).to(device)
    torch.manual_seed(args.seed)  # the value head's initialisation
    model = ValueHeadModel(lm).to(device).eval()  # eval: no dropout, so sampling and training see one policy
    return model, reference


def save_checkpoint(args, step: int, model: ValueHeadModel, tokenizer, optimizer, state: dict) -> Path:
    """checkpoints/step-N, written into a temporary folder renamed only when complete (trainer_state.json last), so
    a run killed mid-save leaves no half-written checkpoint; the last --keep-last are kept."""
    root = args.out / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # the policy (full, or only the adapter) + value_head.safetensors
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[: -args.keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: ValueHeadModel, optimizer, lora: bool) -> dict:
    if lora:
        from peft import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(model.policy, load_peft_weights(str(path)))
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {path} does not fit this adapter: unexpected {result.unexpected_keys}")
    else:
        weights = path / "model.safetensors"
        if not weights.exists():
            raise ValueError(f"checkpoint {path} has no model.safetensors (a LoRA checkpoint? pass --lora)")
        missing, unexpected = model.policy.load_state_dict(load_file(weights), strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}")
    head = load_file(path / VALUE_HEAD_FILE)
    model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in head.items()})
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def export_policy(model: ValueHeadModel, tokenizer, out_dir: Path, lora: bool) -> Path:
    """The trained policy as a plain causal LM (LoRA merged), loadable without tiny_hf for tiny models."""
    policy = model.policy.merge_and_unload() if lora else model.policy
    policy = policy.cpu()
    return tiny_hf.save_model(policy, tokenizer, out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# One PPO step
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout_statistics(model, reference, batch, *, temperature: float, lora: bool):
    """Old log-probs, values and entropies of the policy, and the reference's log-probs, for a rollout batch."""
    input_ids, attention_mask, response_mask = batch
    old = policy_forward(model, input_ids, attention_mask, response_mask, temperature=temperature)
    if lora:
        with model.policy.disable_adapter():
            ref = policy_forward(model.policy, input_ids, attention_mask, response_mask, temperature=temperature)
    else:
        ref = policy_forward(reference, input_ids, attention_mask, response_mask, temperature=temperature)
    return old, ref.logprobs


def ppo_update(model, optimizer, tensors: dict, args: argparse.Namespace, step: int) -> dict:
    """--ppo-epochs passes of minibatch gradient steps; returns the mean statistics over all minibatches."""
    batch_size = tensors["input_ids"].shape[0]
    generator = torch.Generator().manual_seed(request_seed(args.seed, step, -1))
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    count = 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, batch_size, args.minibatch_size):
            idx = order[start : start + args.minibatch_size]
            mb = {k: v[idx] for k, v in tensors.items()}
            out = policy_forward(
                model, mb["input_ids"], mb["attention_mask"], mb["response_mask"], temperature=args.temperature
            )
            pg_loss, pg_stats = policy_loss(
                out.logprobs, mb["logprobs"], mb["advantages"], mb["response_mask"], args.clip_range
            )
            vf_loss, vf_stats = value_loss(
                out.values, mb["values"], mb["returns"], mb["response_mask"], args.clip_range_value
            )
            loss = pg_loss + args.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            stats = {
                "policy_loss": pg_loss,
                "value_loss": vf_loss,
                "clipfrac": pg_stats["clipfrac"],
                "approx_kl": pg_stats["approx_kl"],
                "ratio": pg_stats["ratio"],
                "vf_clipfrac": vf_stats["vf_clipfrac"],
                "grad_norm": grad_norm,
            }
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            count += 1
    return {key: value / count for key, value in sums.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    reward_fns = [load_reward_fn(spec) for spec in args.reward_fn]
    resume_from = latest_checkpoint(args.out)
    if resume_from is not None and not args.resume:
        raise ValueError(f"{args.out} already has checkpoints ({resume_from.name}): pass --resume, or a new --out")
    path = model_path("--model", args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # 1. Tokenizers, data and every check, before the models load.
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    stop_id = stop_token_id(tokenizer, args.stop_token)
    check_tokenizer(tokenizer, stop_id, f"--model {args.model}")
    rows = load_prompts(args.task, args.max_examples)
    for name in {"exact_match", "partial_credit"} & set(args.reward_fn):
        if any("answer" not in r for r in rows):
            raise ValueError(f"--reward-fn {name} needs an 'answer' for every prompt; --task {args.task} lacks it")
    prompt_ids = [
        list(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
        for r in rows
    ]
    reward_model = reward_tokenizer = None
    if args.reward_model is not None:
        from transformers import AutoModelForSequenceClassification

        reward_path = model_path("--reward-model", args.reward_model)
        reward_tokenizer = AutoTokenizer.from_pretrained(reward_path, trust_remote_code=args.trust_remote_code)
        if reward_tokenizer.chat_template is None or reward_tokenizer.pad_token_id is None:
            raise ValueError(f"--reward-model {args.reward_model}: its tokenizer needs a chat template and pad token")
        reward_model = (
            AutoModelForSequenceClassification.from_pretrained(
                reward_path, dtype=torch.float32, trust_remote_code=args.trust_remote_code
            )
            .to(device)
            .eval()
            .requires_grad_(False)
        )

    # 2. Policy (+ value head), reference, optimizer; a checkpoint's state when resuming.
    model, reference = build_policy(path, args, device)
    max_positions = model.config.max_position_embeddings
    fits = [i for i, p in enumerate(prompt_ids) if len(p) + args.max_new_tokens <= max_positions]
    if not fits:
        raise ValueError(
            f"no prompt leaves room for --max-new-tokens={args.max_new_tokens} in the model's "
            f"{max_positions}-token window"
        )
    if len(fits) < len(rows):
        print(f"dropping {len(rows) - len(fits)} prompts too long for {max_positions} positions")
        rows, prompt_ids = [rows[i] for i in fits], [prompt_ids[i] for i in fits]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, eps=1e-5)
    if args.target_kl is not None:
        kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    else:
        kl_controller = FixedKLController(args.kl_coef)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.jsonl"
    start_step = 0
    if args.resume and resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, args.lora)
        start_step, kl_controller.value = state["step"], state["kl_coef"]
        print(f"resumed from {resume_from} at step {start_step}")
        if metrics_path.exists():  # drop what was logged after that checkpoint: those steps run again
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    elif metrics_path.exists():
        metrics_path.unlink()
    if start_step == 0:
        config = {**vars(args), "out": str(args.out), "stop_token_id": stop_id, "prompts": len(rows)}
        (args.out / "run_config.json").write_text(json.dumps(config, indent=2, default=str))

    writer = SummaryWriter(args.out / "tb")
    metrics_file = open(metrics_path, "a")  # noqa: SIM115
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"PPO: {len(rows)} prompts, {trainable / 1e6:.2f}M trainable parameters, "
        f"{'LoRA' if args.lora else 'full'} policy on {device}, stop token id {stop_id}"
    )
    engine = make_engine(model.policy, tokenizer, args.batch_size)
    if engine is None:
        print(f"the engine cannot run {type(model.policy).__name__}: rollouts use generate()")
    progress = tqdm(total=args.max_steps, initial=start_step, disable=args.no_progress, desc="ppo", unit="step")
    for step in range(start_step, args.max_steps):
        # Rollout: sample, cut at the stop token, lay out (prompt + response) rows.
        t0 = time.perf_counter()
        # pretraining's order: a permutation per epoch, a pure function of the step, so a resumed run continues it
        indices = global_batch_indices(step, args.batch_size, len(rows), args.seed)
        batch_rows = [rows[i] for i in indices]
        batch_prompts = [prompt_ids[i] for i in indices]
        seeds = [request_seed(args.seed, step, j) for j in range(len(indices))]
        responses = generate_responses(
            model.policy,
            tokenizer,
            batch_prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            stop_id=stop_id,
            seeds=seeds,
            engine=engine,
        )
        input_ids, attention_mask, response_mask, ended = build_batch(
            batch_prompts, responses, stop_id, tokenizer.pad_token_id
        )
        input_ids, attention_mask, response_mask = (t.to(device) for t in (input_ids, attention_mask, response_mask))
        old, ref_logprobs = rollout_statistics(
            model, reference, (input_ids, attention_mask, response_mask), temperature=args.temperature, lora=args.lora
        )
        t1 = time.perf_counter()

        # Score, then the KL-penalised per-token rewards and the advantages.
        texts = response_texts(tokenizer, responses, stop_id)
        scores = score(
            batch_rows,
            texts,
            responses,
            reward_fns=reward_fns,
            reward_model=reward_model,
            reward_tokenizer=reward_tokenizer,
            reward_max_length=args.reward_max_length,
        )
        if args.missing_eos_penalty is not None:
            scores = eos_penalty(scores, ended, args.missing_eos_penalty)
        scores = scores.to(device)
        t2 = time.perf_counter()
        with torch.no_grad():
            rewards, kl = kl_penalized_rewards(
                scores, old.logprobs, ref_logprobs, response_mask, kl_controller.value, args.kl_estimator
            )
            advantages, returns = gae(rewards, old.values, response_mask, args.gamma, args.lam)
            advantages = whiten(advantages, response_mask)
        tensors = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "logprobs": old.logprobs,
            "values": old.values,
            "advantages": advantages,
            "returns": returns,
        }
        update = ppo_update(model, optimizer, tensors, args, step)
        t3 = time.perf_counter()

        kl_per_sequence = kl.sum(-1).mean().item()
        record = {
            "step": step + 1,
            "score": scores.mean().item(),
            "reward": rewards.sum(-1).mean().item(),  # score - kl_coef * KL, per episode
            "kl": kl_per_sequence,
            "kl_coef": kl_controller.value,
            "entropy": masked_mean(old.entropy, response_mask).item(),
            **update,
            "explained_variance": explained_variance(old.values, returns, response_mask).item(),
            "response_length": response_mask.sum(-1).float().mean().item(),
            "ended": ended.float().mean().item(),
            "rollout_s": t1 - t0,
            "scoring_s": t2 - t1,
            "update_s": t3 - t2,
        }
        kl_controller.update(kl_per_sequence, args.batch_size)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, step + 1)
        if step == start_step:
            writer.add_text("sample", f"{texts[0]!r} (score {scores[0].item():.3f})", step + 1)
        progress.update()
        progress.set_postfix(
            score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}", len=f"{record['response_length']:.1f}"
        )
        done = step + 1
        if done % args.save_every == 0 or done == args.max_steps:
            save_checkpoint(args, done, model, tokenizer, optimizer, {"kl_coef": kl_controller.value})
    progress.close()
    metrics_file.close()
    writer.close()

    # 3. Export and summary (first/last over the whole run, resumed parts included).
    export_policy(model, tokenizer, args.out / "model", args.lora)
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    summary = {
        "model": args.model,
        "task": args.task,
        "reward_model": args.reward_model,
        "reward_fn": args.reward_fn,
        "lora": args.lora,
        "steps": args.max_steps,
        "batch_size": args.batch_size,
        "first_score": records[0]["score"] if records else None,
        "last_score": records[-1]["score"] if records else None,
        "first_reward": records[0]["reward"] if records else None,
        "last_reward": records[-1]["reward"] if records else None,
        "first_kl": records[0]["kl"] if records else None,
        "last_kl": records[-1]["kl"] if records else None,
        "last_kl_coef": kl_controller.value,
        "model_dir": str(args.out / "model"),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
