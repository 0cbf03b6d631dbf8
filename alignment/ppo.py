"""PPO for language models (RLHF): the SFT policy samples answers, a reward scores them, the policy moves toward
higher reward while a KL penalty keeps it near the SFT model. TRL 1.x no longer ships PPO; this is ours, built on
alignment/rl.py (the per-token maths) and tiny_hf's chat generation (the rollouts).

    tiny-hf ppo --model runs/sft --reward-fn exact_match --task verifiable --out runs/ppo
    tiny-hf ppo --model runs/sft --reward-model runs/reward --task docs --out runs/ppo-rm
    tiny-hf ppo --model runs/sft --reward-model runs/reward --reward-fn exact_match --lora
    tiny-hf ppo ... --out runs/ppo --resume                       # continue from the last checkpoint

One PPO step (Ziegler et al. 2019; Ouyang et al. 2022; the details of Huang et al. 2024):
1. rollout: a batch of prompts (chat template + generation prompt) is sampled at --temperature by
   `tiny_hf.chat.chat_generate` (tiny_hf's engine, prefix cache off since cached prompt KV would be stale after an
   update; a PEFT policy runs as its base model with the adapters injected and active; models the engine cannot run
   use `generate()`), with a seed per request, so a step's samples are a function of the weights and the step
   alone; responses are cut after the stop token (the chat template's end of turn).
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
seconds spent in rollout/scoring/update (training/run_log.py: metrics.jsonl, and the `--report-to` trackers of
training/trackers.py: TensorBoard in <out>/tb by default, trackio, wandb); checkpoints (policy, value head,
optimizer, RNG, step, KL coefficient; training/checkpoint.py) are written atomically, the last K kept, and `--resume`
continues so that, on one CPU process, the following steps log the same numbers as an uninterrupted run. At the end
the policy is exported to <out>/model (merged if LoRA) and summary.json holds first/last score and KL.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf  # registers the Auto classes
from alignment import lora_config
from alignment.data import digit_reward, exact_match_reward, parse_task_spec, partial_credit_reward
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
from tiny_hf.chat import END_OF_TURN, chat_generate, encode_prompts, make_engine
from tiny_hf.engine import Engine
from tiny_hf.options import parse_options
from tiny_hf.runs import model_path
from training.batches import global_batch_indices
from training.checkpoint import (
    RunLock,
    StopRequest,
    load_optimizer,
    load_rng,
    load_weights,
    optimizer_file,
    read_state,
    resume_point,
    save_rng,
    save_torch,
    write_checkpoint,
)
from training.model_card import stage_facts, write_model_card
from training.run_log import RunLog, read_metrics, write_run_config
from training.trackers import check_report_to

TASKS = ("verifiable", "arithmetic", "docs")  # arithmetic also as "arithmetic:add,sub" (alignment.data)
# Reward functions by name, TRL's signature: fn(prompts=..., completions=..., completion_ids=..., **columns) -> floats.
# `--reward-fn` also takes "package.module:function".
REWARD_FUNCTIONS: dict[str, Callable] = {
    "exact_match": exact_match_reward,
    "partial_credit": partial_credit_reward,
    "digits": digit_reward,
}
# Metrics compared between an interrupted and a resumed run: everything but wall-clock seconds.
TIMING_KEYS = ("rollout_s", "scoring_s", "update_s")


@dataclass
class PPOOptions:
    # --- model ---
    model: str = field(default="runs/sft", metadata={"help": "the SFT run (a run folder or a model folder)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (+ the value head); reference = base"})
    rank: int = field(default=16, metadata={"help": "LoRA rank"})
    stop_token: str | None = field(
        default=None, metadata={"help": f"ends a response (default: {END_OF_TURN} if known, else eos)"}
    )
    trust_remote_code: bool = False
    # --- reward ---
    reward_model: str | None = field(default=None, metadata={"help": "a reward run/model folder (tiny-hf reward)"})
    reward_fn: list[str] = field(
        default_factory=list,
        metadata={"action": "extend", "help": f"one of {sorted(REWARD_FUNCTIONS)} or package.module:function"},
    )
    reward_max_length: int = field(default=512, metadata={"help": "tokens the reward model reads"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "score of a response that never emits the stop token (default: keep it)"}
    )
    # --- data ---
    task: str = field(default="verifiable", metadata={"help": f"one of {list(TASKS)} or a local prompt .jsonl"})
    max_examples: int | None = field(default=None, metadata={"help": "use a fixed subset of the prompts"})
    # --- rollout ---
    batch_size: int = field(default=16, metadata={"help": "prompts (episodes) per PPO step"})
    max_new_tokens: int = 32
    temperature: float = field(default=0.7, metadata={"help": "sampling and training temperature"})
    # --- PPO ---
    max_steps: int = 200
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    minibatch_size: int = field(default=8, metadata={"help": "episodes per gradient step"})
    lr: float = 1e-5
    clip_range: float = field(default=0.2, metadata={"help": "epsilon of the clipped surrogate"})
    clip_range_value: float = field(default=0.2, metadata={"help": "epsilon of the clipped value loss"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    gamma: float = 1.0
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    max_grad_norm: float = 1.0
    # --- KL penalty ---
    kl_coef: float = field(default=0.05, metadata={"help": "beta (the start value when adaptive)"})
    kl_estimator: str = field(default="k1", metadata={"choices": sorted(KL_ESTIMATORS)})
    target_kl: float | None = field(default=None, metadata={"help": "adaptive beta aiming at this KL per sequence"})
    kl_horizon: float = field(default=10000, metadata={"help": "adaptive controller horizon (episodes)"})
    # --- output and checkpoints ---
    out: Path = Path("runs/ppo")
    save_every: int = 50
    keep_last: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
    report_to: str = field(
        default="tensorboard", metadata={"help": "trackers: tensorboard, trackio, wandb or none (comma-separated)"}
    )
    no_progress: bool = False
    # --- system ---
    seed: int = 0
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})


# ---------------------------------------------------------------------------------------------------------------------
# Checks: everything that would otherwise fail (or silently train on nonsense) after minutes, before anything loads.
# ---------------------------------------------------------------------------------------------------------------------
COUNTS = ("batch_size", "max_new_tokens", "max_steps", "ppo_epochs", "minibatch_size", "save_every", "keep_last")
POSITIVE = ("clip_range", "clip_range_value", "temperature", "lr", "max_grad_norm", "kl_horizon")


def check_options(options: PPOOptions) -> None:
    for name in (*COUNTS, "rank", "reward_max_length"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(options, name)} must be at least 1")
    if options.minibatch_size > options.batch_size:
        raise ValueError(f"--minibatch-size={options.minibatch_size} is larger than --batch-size={options.batch_size}")
    if not options.kl_coef >= 0:
        raise ValueError(
            f"--kl-coef={options.kl_coef} must be >= 0 (a negative coefficient rewards drifting from the reference)"
        )
    for name in POSITIVE:
        if not getattr(options, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(options, name)} must be > 0")
    if options.target_kl is not None and not options.target_kl > 0:
        raise ValueError(f"--target-kl={options.target_kl} must be > 0")
    if not options.vf_coef >= 0:
        raise ValueError(f"--vf-coef={options.vf_coef} must be >= 0")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(options, name) <= 1:
            raise ValueError(f"--{name}={getattr(options, name)} must be in [0, 1]")
    if options.reward_model is None and not options.reward_fn:
        raise ValueError("no reward: pass --reward-model DIR and/or --reward-fn NAME")
    check_report_to(options.report_to)
    for spec in options.reward_fn:
        load_reward_fn(spec)
    if options.task.partition(":")[0] == "arithmetic":
        parse_task_spec(options.task)
    elif options.task not in TASKS and not Path(options.task).is_file():
        raise ValueError(f"--task {options.task!r} is not one of {list(TASKS)} nor an existing prompt .jsonl file")


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
    """The token that ends a response: --stop-token, else the chat template's end of turn, else eos."""
    token = name or (END_OF_TURN if END_OF_TURN in tokenizer.get_vocab() else tokenizer.eos_token)
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
    elif task.partition(":")[0] == "arithmetic":
        from alignment.data import arithmetic_dataset

        rows = list(arithmetic_dataset(task, train_size=max_examples)["train"])
    elif task == "docs":
        from alignment.data import preference_dataset

        data = preference_dataset(max_examples=max_examples, stdlib_dir=stdlib_dir)["train"]
        rows = [{"prompt": r["prompt"], "id": r["id"]} for r in data]
    else:
        rows = prompt_file(task)
        rows = rows[:max_examples] if max_examples is not None else rows
    if not rows:
        raise ValueError(f"--task {task}: no prompts")
    return rows


def prompt_file(path: str) -> list[dict]:
    """The rows of a prompt .jsonl file; a string prompt becomes one user turn."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("prompt"):
            raise ValueError(f"--task {path}: line {i + 1} has no 'prompt' (a string or a list of chat turns)")
        if isinstance(row["prompt"], str):
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
        rows.append(row)
    return rows


def request_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + index) % (2**63)


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------------------
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
    """One sampled response per prompt (token ids, the stop token included when emitted; only it ends a response),
    through `tiny_hf.chat.chat_generate`: `engine` when given (a seed per request, so a response does not depend
    on the batch it ran in), else `generate()` with a forked RNG seeded by the batch's first seed."""
    replies = chat_generate(
        policy,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seeds=seeds,
        stop_ids=[stop_id],
        engine=engine,
        batch_size=max(1, len(prompt_ids)),
    )
    return [reply.token_ids for reply in replies]


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
def build_policy(path: str, options: PPOOptions, device: torch.device):
    """(ValueHeadModel, reference or None): LoRA policies use their own base (adapters disabled) as the reference."""
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=options.trust_remote_code)
    reference = None
    if options.lora:
        from peft import get_peft_model

        lm = get_peft_model(lm, lora_config(options.rank, task_type=None))
    else:
        reference = copy.deepcopy(lm).eval().requires_grad_(False).to(device)
    torch.manual_seed(options.seed)  # the value head's initialisation
    model = ValueHeadModel(lm).to(device).eval()  # eval: no dropout, so sampling and training see one policy
    return model, reference


def load_reward_model(options: PPOOptions, device: torch.device):
    """(reward model, its tokenizer), or (None, None) without --reward-model."""
    if options.reward_model is None:
        return None, None
    from transformers import AutoModelForSequenceClassification

    path = model_path("--reward-model", options.reward_model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    if tokenizer.chat_template is None or tokenizer.pad_token_id is None:
        raise ValueError(f"--reward-model {options.reward_model}: its tokenizer needs a chat template and pad token")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=options.trust_remote_code
    )
    return model.to(device).eval().requires_grad_(False), tokenizer


def save_checkpoint(run: PPORun, step: int) -> Path:
    """checkpoints/step-N (training/checkpoint.py writes it atomically): the policy (full, or only the adapter)
    with value_head.safetensors, the tokenizer, optimizer, RNG and the KL coefficient."""

    def save(folder: Path) -> None:
        run.model.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)
        save_torch(run.optimizer.state_dict(), optimizer_file(folder))
        save_rng(folder)

    state = {"kl_coef": run.kl_controller.value}
    return write_checkpoint(run.options.out, step, save, state=state, keep_last=run.options.keep_last)


def load_checkpoint(path: Path, model: ValueHeadModel, optimizer, lora: bool) -> dict:
    """Restore the policy (or its adapter), value head, optimizer and RNG; returns the loop's state."""
    if lora:
        from peft import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(model.policy, load_peft_weights(str(path)))
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {path} does not fit this adapter: unexpected {result.unexpected_keys}")
    else:
        load_weights(path, model.policy, hint="a LoRA checkpoint? pass --lora")
    head = load_file(path / VALUE_HEAD_FILE)
    model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in head.items()})
    load_optimizer(path, optimizer)
    load_rng(path)
    return read_state(path)


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


def ppo_update(model, optimizer, tensors: dict, options: PPOOptions, step: int) -> dict:
    """--ppo-epochs passes of minibatch gradient steps; returns the mean statistics over all minibatches."""
    batch_size = tensors["input_ids"].shape[0]
    generator = torch.Generator().manual_seed(request_seed(options.seed, step, -1))
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    count = 0
    for _ in range(options.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, batch_size, options.minibatch_size):
            idx = order[start : start + options.minibatch_size]
            mb = {k: v[idx] for k, v in tensors.items()}
            out = policy_forward(
                model, mb["input_ids"], mb["attention_mask"], mb["response_mask"], temperature=options.temperature
            )
            pg_loss, pg_stats = policy_loss(
                out.logprobs, mb["logprobs"], mb["advantages"], mb["response_mask"], options.clip_range
            )
            vf_loss, vf_stats = value_loss(
                out.values, mb["values"], mb["returns"], mb["response_mask"], options.clip_range_value
            )
            loss = pg_loss + options.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
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
# The run: setup, rollout, step, finish
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PPORun:
    """Everything the loop reads and updates, built once by `setup`."""

    options: PPOOptions
    device: torch.device
    tokenizer: object
    stop_id: int
    rows: list[dict]  # the prompts and their other columns
    prompt_ids: list[list[int]]
    reward_fns: list[Callable]
    reward_model: object
    reward_tokenizer: object
    model: ValueHeadModel
    reference: torch.nn.Module | None  # None with --lora: the policy with its adapters disabled
    optimizer: torch.optim.Optimizer
    kl_controller: AdaptiveKLController | FixedKLController
    engine: Engine | None
    start_step: int
    log: RunLog


def fitting_prompts(rows: list[dict], prompt_ids: list[list[int]], max_new_tokens: int, max_positions: int):
    """The prompts that leave room for `max_new_tokens` in the model's window (an error when none does)."""
    fits = [i for i, p in enumerate(prompt_ids) if len(p) + max_new_tokens <= max_positions]
    if not fits:
        raise ValueError(
            f"no prompt leaves room for --max-new-tokens={max_new_tokens} in the model's {max_positions}-token window"
        )
    if len(fits) < len(rows):
        print(f"dropping {len(rows) - len(fits)} prompts too long for {max_positions} positions")
    return [rows[i] for i in fits], [prompt_ids[i] for i in fits]


def setup(options: PPOOptions) -> PPORun:
    """Every check, the tokenizer and prompts, the reward, the policy with its reference and optimizer, and a
    checkpoint's state when resuming; then the log."""
    check_options(options)
    reward_fns = [load_reward_fn(spec) for spec in options.reward_fn]
    resume_from = resume_point(options.out, options.resume)
    path = model_path("--model", options.model)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    stop_id = stop_token_id(tokenizer, options.stop_token)
    check_tokenizer(tokenizer, stop_id, f"--model {options.model}")
    rows = load_prompts(options.task, options.max_examples)
    for name in {"exact_match", "partial_credit", "digits"} & set(options.reward_fn):
        if any("answer" not in r for r in rows):
            raise ValueError(f"--reward-fn {name} needs an 'answer' for every prompt; --task {options.task} lacks it")
    reward_model, reward_tokenizer = load_reward_model(options, device)
    model, reference = build_policy(path, options, device)
    rows, prompt_ids = fitting_prompts(
        rows,
        encode_prompts(tokenizer, [r["prompt"] for r in rows]),
        options.max_new_tokens,
        model.config.max_position_embeddings,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr, eps=1e-5)
    if options.target_kl is not None:
        kl_controller = AdaptiveKLController(options.kl_coef, options.target_kl, options.kl_horizon)
    else:
        kl_controller = FixedKLController(options.kl_coef)
    options.out.mkdir(parents=True, exist_ok=True)
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, options.lora)
        start_step, kl_controller.value = state["step"], state["kl_coef"]
        print(f"resumed from {resume_from} at step {start_step}")
    else:
        write_run_config(options.out, options, **stage_facts("ppo", options), stop_token_id=stop_id, prompts=len(rows))
    engine = make_engine(model.policy, tokenizer, options.batch_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"PPO: {len(rows)} prompts, {trainable / 1e6:.2f}M trainable parameters, "
        f"{'LoRA' if options.lora else 'full'} policy on {device}, stop token id {stop_id}"
        + ("" if engine else f"; the engine cannot run {type(model.policy).__name__}: rollouts use generate()")
    )
    return PPORun(
        options,
        device,
        tokenizer,
        stop_id,
        rows,
        prompt_ids,
        reward_fns,
        reward_model,
        reward_tokenizer,
        model,
        reference,
        optimizer,
        kl_controller,
        engine,
        start_step,
        RunLog(options.out, start_step, report_to=options.report_to),
    )


def rollout(run: PPORun, step: int) -> dict:
    """Sample the step's prompts (pretraining's order: a permutation per epoch, a pure function of the step, so a
    resumed run continues it), cut at the stop token, and the policy's and reference's statistics of the rows."""
    options = run.options
    indices = global_batch_indices(step, options.batch_size, len(run.rows), options.seed)
    prompts = [run.prompt_ids[i] for i in indices]
    responses = generate_responses(
        run.model.policy,
        run.tokenizer,
        prompts,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        stop_id=run.stop_id,
        seeds=[request_seed(options.seed, step, j) for j in range(len(indices))],
        engine=run.engine,
    )
    *batch, ended = build_batch(prompts, responses, run.stop_id, run.tokenizer.pad_token_id)
    batch = tuple(t.to(run.device) for t in batch)  # input_ids, attention_mask, response_mask
    old, ref_logprobs = rollout_statistics(
        run.model, run.reference, batch, temperature=options.temperature, lora=options.lora
    )
    rows = [run.rows[i] for i in indices]
    return {"rows": rows, "responses": responses, "batch": batch, "ended": ended, "old": old, "ref": ref_logprobs}


def score_rollout(run: PPORun, sample: dict) -> tuple[list[str], torch.Tensor]:
    """The texts of the responses and their scores (B,), the missing-eos penalty applied."""
    texts = response_texts(run.tokenizer, sample["responses"], run.stop_id)
    scores = score(
        sample["rows"],
        texts,
        sample["responses"],
        reward_fns=run.reward_fns,
        reward_model=run.reward_model,
        reward_tokenizer=run.reward_tokenizer,
        reward_max_length=run.options.reward_max_length,
    )
    if run.options.missing_eos_penalty is not None:
        scores = eos_penalty(scores, sample["ended"], run.options.missing_eos_penalty)
    return texts, scores.to(run.device)


def ppo_step(run: PPORun, step: int) -> tuple[dict, str]:
    """One PPO step: rollout, score, KL-penalised rewards and advantages, the update. Returns the step's record
    and the first response (with its score) for TensorBoard."""
    options, kl_controller = run.options, run.kl_controller
    t0 = time.perf_counter()
    sample = rollout(run, step)
    t1 = time.perf_counter()
    texts, scores = score_rollout(run, sample)
    t2 = time.perf_counter()
    old, (input_ids, attention_mask, response_mask) = sample["old"], sample["batch"]
    with torch.no_grad():
        rewards, kl = kl_penalized_rewards(
            scores, old.logprobs, sample["ref"], response_mask, kl_controller.value, options.kl_estimator
        )
        advantages, returns = gae(rewards, old.values, response_mask, options.gamma, options.lam)
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
    update = ppo_update(run.model, run.optimizer, tensors, options, step)
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
        "ended": sample["ended"].float().mean().item(),
        "rollout_s": t1 - t0,
        "scoring_s": t2 - t1,
        "update_s": t3 - t2,
    }
    kl_controller.update(kl_per_sequence, options.batch_size)
    return record, f"{texts[0]!r} (score {scores[0].item():.3f})"


def finish(run: PPORun) -> dict:
    """Export the policy and write summary.json (first/last over the whole run, resumed parts included)."""
    options = run.options
    export_policy(run.model, run.tokenizer, options.out / "model", options.lora)
    records = read_metrics(options.out)
    first, last = (records[0], records[-1]) if records else ({}, {})
    summary = {
        "model": options.model,
        "task": options.task,
        "reward_model": options.reward_model,
        "reward_fn": options.reward_fn,
        "lora": options.lora,
        "steps": options.max_steps,
        "batch_size": options.batch_size,
        **{
            f"{end}_{key}": r.get(key)
            for key in ("score", "reward", "kl")
            for end, r in (("first", first), ("last", last))
        },
        "last_kl_coef": run.kl_controller.value,
        "model_dir": str(options.out / "model"),
    }
    (options.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(options.out)
    return summary


def train(options: PPOOptions) -> dict:
    """Run PPO with `options`; returns the summary. SIGTERM stops it after the current step with a checkpoint, and
    exits 0 (`--resume` continues it)."""
    with RunLock(options.out):
        return train_locked(options)


def train_locked(options: PPOOptions) -> dict:
    """`train` while this run holds its output folder."""
    run = setup(options)
    with run.log, StopRequest() as stop:
        progress = tqdm(
            total=options.max_steps, initial=run.start_step, disable=options.no_progress, desc="ppo", unit="step"
        )
        for step in range(run.start_step, options.max_steps):
            record, sample = ppo_step(run, step)
            run.log.log(record)
            if step == run.start_step:
                run.log.text("sample", sample, step + 1)
            progress.update()
            progress.set_postfix(
                score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}", len=f"{record['response_length']:.1f}"
            )
            done = step + 1
            if done % options.save_every == 0 or done == options.max_steps or stop.requested:
                save_checkpoint(run, done)
            if stop.requested:
                progress.close()
                print(f"stopped by SIGTERM after step {done}, checkpoint written: --resume continues")
                raise SystemExit(0)
        progress.close()
    return finish(run)


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(PPOOptions, argv=argv, description=__doc__)
    return train(options)


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
