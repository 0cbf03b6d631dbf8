"""Reinforcement learning with verifiable rewards: GRPO or RLOO (TRL's `GRPOTrainer` / `RLOOTrainer`) on "Which
module of the standard library defines `name`?", whose answer code can check.

    python alignment/grpo.py --model runs/sft --out runs/grpo                        # GRPO, exact-match reward
    python alignment/grpo.py --model runs/sft --algo rloo --out runs/rloo --lora     # RLOO with LoRA adapters
    python alignment/grpo.py --model runs/sft --rewards exact_match,format --reward-model runs/reward

Both sample `--num-generations` answers per prompt and score each; neither has a value model. The advantage of an
answer is its reward against the others of its group: GRPO (Shao et al. 2024, DeepSeekMath) subtracts the group's
mean and divides by its std; RLOO (Ahmadian et al. 2024, "Back to Basics") subtracts the mean of the *other*
answers (leave-one-out). Either way a group whose rewards all tie (all right, or, far more often on a small model,
all wrong) has zero advantage everywhere and teaches nothing: the summary reports that share of groups (TRL logs
it as `frac_reward_zero_std`). `--beta` > 0 adds a KL penalty towards the starting model (with LoRA: the adapters
switched off; else TRL loads a second copy from the folder).

Rewards: python functions by name (REWARD_FUNCS: `exact_match`, the module named first is the right one; `format`,
the answer is one backticked name) and/or a reward model folder (alignment/reward.py's `<out>/model`), summed.

Reports held-out exact match with greedy decoding before and after, and the logged rewards, in
`<out>/summary.md`; `--results bench/results` also writes `<algo>.md`/`.json`. The policy (with LoRA: merged) is
exported to `<out>/model`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import tiny_hf
from alignment import trl_defaults
from alignment.data import exact_match_reward, partial_credit_reward, preference_dataset, verifiable_dataset
from tiny_hf.engine import Engine, SamplingParams
from tiny_hf.results import markdown_cell, write_results
from tiny_hf.runs import model_path

IM_END = "<|im_end|>"
ALGOS = ("grpo", "rloo")
# What the trainers log per step that the summary keeps (TRL's names; `kl` only when beta > 0).
LOGGED = ("reward", "reward_std", "frac_reward_zero_std", "kl", "completions/mean_length")


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 where the answer is a single backticked dotted name ("`json.decoder`"), the form SFT taught, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.fullmatch(r"`[A-Za-z_][\w.]*`", t.strip()) else 0.0 for t in texts]


# Python rewards by name, all with TRL's reward-function signature (completions, **dataset columns) -> floats.
REWARD_FUNCS = {"exact_match": exact_match_reward, "partial_credit": partial_credit_reward, "format": format_reward}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="runs/sft", help="the SFT run (a run folder, model folder or Hub id)")
    model.add_argument("--lora", action="store_true", help="train LoRA adapters (r=--rank)")
    model.add_argument("--rank", type=int, default=16)
    model.add_argument("--trust-remote-code", action="store_true")
    algo = parser.add_argument_group("algorithm and rewards")
    algo.add_argument("--algo", default="grpo", help=f"one of {list(ALGOS)}")
    algo.add_argument(
        "--rewards", default="exact_match", help=f"comma-separated, from {list(REWARD_FUNCS)}; '' = none"
    )
    algo.add_argument("--reward-model", default=None, help="a reward model folder (alignment/reward.py's <out>/model)")
    algo.add_argument("--num-generations", type=int, default=8, help="answers sampled per prompt (the group)")
    algo.add_argument("--max-completion-length", type=int, default=24, help="tokens per sampled answer")
    algo.add_argument("--temperature", type=float, default=1.0)
    algo.add_argument("--beta", type=float, default=0.0, help="KL coefficient towards the start model; 0 = none")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default="embedded",
        help="embedded (the verifiable questions), docs (the preference "
        "task's prompts, for --reward-model), or .json/.jsonl with 'prompt' and 'answer'",
    )
    data.add_argument("--max-examples", type=int, default=None, help="train on a fixed subset (quick runs)")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=32, help="completions per step (a multiple of the group)")
    train.add_argument("--lr", type=float, default=1e-5)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--seed", type=int, default=0)
    report = parser.add_argument_group("report")
    report.add_argument("--eval-examples", type=int, default=200, help="held-out questions for the exact match")
    report.add_argument("--logging-steps", type=int, default=5)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/grpo"))
    out.add_argument("--results", type=Path, default=None, help="also write <algo>.md/.json here (bench/results)")
    args = parser.parse_args(argv)
    args.reward_names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.algo not in ALGOS:
        raise ValueError(f"--algo={args.algo!r} is not one of {list(ALGOS)}")
    for name in args.reward_names:
        if name not in REWARD_FUNCS:
            raise ValueError(f"--rewards: {name!r} is not one of {list(REWARD_FUNCS)}")
    if not args.reward_names and args.reward_model is None:
        raise ValueError("no reward: give --rewards and/or --reward-model")
    if args.num_generations < 2:
        raise ValueError(
            f"--num-generations={args.num_generations} must be at least 2: the advantage compares an "
            "answer with the others of its group"
        )
    if args.batch_size % args.num_generations:
        raise ValueError(
            f"--batch-size={args.batch_size} must be a multiple of --num-generations="
            f"{args.num_generations} (whole groups per step)"
        )
    if not args.beta >= 0:
        raise ValueError(f"--beta={args.beta} must be >= 0 (a negative KL coefficient rewards drifting away)")
    if not args.temperature > 0 or not args.lr > 0:
        raise ValueError(f"--temperature={args.temperature} and --lr={args.lr} must be > 0")
    for name in ("max_steps", "batch_size", "max_completion_length", "rank", "eval_examples", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")


def load_verifiable(spec: str, max_examples: int | None) -> datasets.DatasetDict:
    """The verifiable questions (`embedded`), the docs prompts (`docs`, answer = the true summary) or a local file of
    `prompt` + `answer` rows (the column `exact_match` checks); returned with `prompt` and `answer` only."""
    if spec == "embedded":
        data = verifiable_dataset(max_examples=max_examples)
    elif spec == "docs":  # the preference task's prompts; `answer` = the true summary (for a reward model to judge)
        pairs = preference_dataset(max_examples=max_examples)
        data = pairs.map(lambda row: {"answer": row["chosen"][-1]["content"]})
    else:
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"--data {spec}: no such file or folder")
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.json*"))
        loaded = datasets.load_dataset("json", data_files=files)["train"]
        if missing := {"prompt", "answer"} - set(loaded.column_names):
            raise ValueError(f"--data {spec}: rows need 'prompt' and 'answer'; {sorted(missing)} missing")
        data = loaded.train_test_split(test_size=0.1, seed=0)
        if max_examples is not None:
            data["train"] = data["train"].select(range(min(max_examples, len(data["train"]))))
    return datasets.DatasetDict({split: ds.select_columns(["prompt", "answer"]) for split, ds in data.items()})


def greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts, stopping at <|im_end|>: tiny_hf's engine (batched, continuous) where the model
    is a TinyForCausalLM, else `model.generate` on a left-padded batch."""
    was_training = model.training
    model.eval()
    ids = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts
    ]
    stop = [t for t in (tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id) if t is not None]
    try:
        engine = Engine(model, tokenizer, max_batch_size=max(1, min(len(ids), 64)), window_policy="truncate")
    except TypeError:  # not a tiny_hf model
        engine = None
    if engine is not None:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop_token_ids=stop)
        texts = [done.text for done in engine.generate(ids, params)]
    else:
        texts = []
        device = next(model.parameters()).device
        for start in range(0, len(ids), 32):
            batch = ids[start : start + 32]
            width = max(len(x) for x in batch)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in batch], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=tokenizer.pad_token_id,
                )
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return [t.split(IM_END)[0].strip() for t in texts]


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    """Held-out exact match of greedy answers (the `exact_match` reward, averaged) and a few samples."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    scores = exact_match_reward(answers, [r["answer"] for r in rows])
    return {"exact_match": sum(scores) / max(len(scores), 1), "answers": answers}


def rl_config(args: argparse.Namespace, eos_token_ids: list[int]):
    from trl import GRPOConfig, RLOOConfig

    # With beta > 0 and no LoRA, TRL loads the reference with create_model_from_path(config._name_or_path), which
    # reads `config.auto_map` to pick an Auto class for architectures outside transformers: a folder saved without
    # one (plain save_pretrained of a TinyForCausalLM) fails there with AttributeError (TRL 1.16, transformers 5.24).
    # Naming the Auto class skips that guess; TRL warns that model_init_kwargs are ignored, which holds for the policy.
    model_init_kwargs = {"architecture": AutoModelForCausalLM} if args.beta > 0 and not args.lora else None

    config_class = GRPOConfig if args.algo == "grpo" else RLOOConfig
    return config_class(
        output_dir=str(args.out / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        beta=args.beta,
        logging_steps=args.logging_steps,
        seed=args.seed,
        log_completions=False,
        **trl_defaults(),
        generation_kwargs={"eos_token_id": eos_token_ids},  # stop at <|im_end|>, the end of an assistant turn
        model_init_kwargs=model_init_kwargs,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    from trl import GRPOTrainer, RLOOTrainer

    path = model_path("--model", args.model)
    data = load_verifiable(args.data, args.max_examples)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"--model {args.model}: the tokenizer has no chat template to format the questions with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    # Loaded from the folder: with --beta > 0 and no LoRA, TRL loads the reference from config._name_or_path.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    eos_token_ids = [t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)) if t is not None]
    eos_token_ids = list(dict.fromkeys(t for t in eos_token_ids if t != tokenizer.unk_token_id))
    reward_funcs, reward_classes = [REWARD_FUNCS[name] for name in args.reward_names], [None] * len(args.reward_names)
    if args.reward_model is not None:
        reward_path = model_path("--reward-model", args.reward_model)
        reward_tokenizer = AutoTokenizer.from_pretrained(reward_path, trust_remote_code=args.trust_remote_code)
        if reward_tokenizer.pad_token is None:
            raise ValueError(f"--reward-model {args.reward_model}: the tokenizer has no pad token (batched scoring)")
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            reward_path, num_labels=1, dtype=dtype, trust_remote_code=args.trust_remote_code
        )
        reward_funcs.append(reward_model)
        reward_classes.append(reward_tokenizer)
    peft_config = None
    if args.lora:
        from peft import LoraConfig, TaskType

        peft_config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            task_type=TaskType.CAUSAL_LM,
            target_modules="all-linear",
        )

    held_out = list(data["test"].select(range(min(args.eval_examples, len(data["test"])))))
    start = time.perf_counter()
    before = exact_match(model, tokenizer, held_out, args.max_completion_length)
    print(f"held-out exact match before {args.algo.upper()}: {before['exact_match']:.1%}")
    trainer_class = GRPOTrainer if args.algo == "grpo" else RLOOTrainer
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=rl_config(args, eos_token_ids),
        train_dataset=data["train"],
        processing_class=tokenizer,
        reward_processing_classes=reward_classes,
        peft_config=peft_config,
    )
    trainer.train()
    model = trainer.model
    if args.lora:
        model = model.merge_and_unload()
    after = exact_match(model, tokenizer, held_out, args.max_completion_length)
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out exact match after {args.algo.upper()}: {after['exact_match']:.1%} ({minutes:.1f} min)")

    args.out.mkdir(parents=True, exist_ok=True)
    out_model = args.out / "model"
    tiny_hf.save_model(model, tokenizer, out_model)
    keys = LOGGED + tuple(f"rewards/{name}/mean" for name in trainer.reward_func_names)
    log = [{k: r[k] for k in ("step", *keys) if k in r} for r in trainer.state.log_history if "reward" in r]
    ties = [r["frac_reward_zero_std"] for r in log if "frac_reward_zero_std" in r]
    figures = {
        "model": args.model,
        "data": args.data,
        "algo": args.algo,
        "lora": args.lora,
        "rewards": list(trainer.reward_func_names),
        "beta": args.beta,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "train_questions": len(data["train"]),
        "held_out_questions": len(held_out),
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "minutes": round(minutes, 2),
        # Share of prompt groups whose rewards all tie (zero std: zero advantage, no gradient), over the logged steps.
        "tied_group_share": sum(ties) / len(ties) if ties else None,
        "held_out_exact_match_before": before["exact_match"],
        "held_out_exact_match_after": after["exact_match"],
        "log": log,
        "samples": [
            {"question": r["prompt"][-1]["content"], "answer": r["answer"], "before": b, "after": a}
            for r, b, a in zip(held_out[:5], before["answers"], after["answers"], strict=False)
        ],
    }
    table = summary_markdown(figures)
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "summary.md").write_text(table)
    if args.results is not None:
        write_results(args.algo, figures, table, args.results)
    print(table)
    return figures


def summary_markdown(figures: dict) -> str:
    ties = figures["tied_group_share"]
    reward_keys = [f"rewards/{name}/mean" for name in figures["rewards"]]
    lines = [
        f"# {figures['algo'].upper()}: {figures['model']} on `{figures['data']}`",
        "",
        f"{figures['train_questions']:,} training questions, {figures['max_steps']} steps of {figures['batch_size']} "
        f"completions ({figures['num_generations']} per question, at most {figures['max_completion_length']} tokens), "
        f"rewards {', '.join(figures['rewards'])}, beta {figures['beta']}, lr {figures['lr']}"
        f"{', LoRA' if figures['lora'] else ', full fine-tune'}, {figures['minutes']:.1f} minutes.",
        "",
        "| | held-out exact match (greedy) |",
        "|---|---:|",
        f"| before | {figures['held_out_exact_match_before']:.1%} |",
        f"| after | {figures['held_out_exact_match_after']:.1%} |",
        "",
        "Tied groups (every answer the same reward: zero advantage, no learning signal): "
        + (f"{ties:.1%} of prompt groups." if ties is not None else "not logged."),
        "",
        "| step | mean reward | " + " | ".join(reward_keys) + " | tied groups |",
        "|---:|---:|" + "---:|" * len(reward_keys) + "---:|",
    ]
    for r in figures["log"]:
        cells = " | ".join(f"{r.get(k, float('nan')):.3f}" for k in reward_keys)
        lines.append(f"| {r.get('step', '')} | {r['reward']:.3f} | {cells} | {r.get('frac_reward_zero_std', 0):.1%} |")
    lines += [
        "",
        f"Greedy answers to held-out questions ({figures['held_out_questions']} held out):",
        "",
        "| question | answer | before | after |",
        "|---|---|---|---|",
    ]
    for s in figures["samples"]:
        lines.append(
            "| " + " | ".join(markdown_cell(s[key]) for key in ("question", "answer", "before", "after")) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
