"""Reward model: a scalar score that prefers the chosen answer of a preference pair, with TRL's `RewardTrainer`.

    python alignment/reward.py --model runs/sft --out runs/reward                  # the embedded docs preferences
    python alignment/reward.py --model runs/sft --out runs/reward-lora --lora      # LoRA, score head in full
    accelerate launch alignment/reward.py --model runs/sft --data prefs.jsonl      # any TRL preference data

The model is the SFT run loaded as `AutoModelForSequenceClassification` with one label: the causal LM's body and a
new `score` head read at the last real token (TinyForSequenceClassification). The loss is Bradley-Terry's
-log sigmoid(r_chosen - r_rejected) (Ouyang et al. 2022, Sec. 3.5): only reward differences are learned, so
`--center-rewards` adds a small penalty on (r_chosen + r_rejected)^2 to keep the scores near 0 (Eisenstein et al.
2023), which PPO's KL-penalised reward is sensitive to.

Reports held-out pairwise accuracy (overall and per kind of rejected answer; goal >= 90%) and a histogram of the
reward margins r_chosen - r_rejected (`margins.png`) in `<out>/summary.md`; `--results bench/results` also writes
`reward_model.md`/`.json`. The model is exported to `<out>/model` (with LoRA: merged), where
`AutoModelForSequenceClassification.from_pretrained` loads it, with or without tiny_hf installed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tiny_hf
from alignment import trl_defaults
from alignment.data import load_preference_dataset
from tiny_hf.results import write_results
from tiny_hf.runs import model_path

ACCURACY_GOAL = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="runs/sft", help="the SFT run (a run folder, model folder or Hub id)")
    model.add_argument("--lora", action="store_true", help="train LoRA adapters (r=--rank) and the score head")
    model.add_argument("--rank", type=int, default=16)
    model.add_argument("--trust-remote-code", action="store_true")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="embedded", help="embedded, a .json/.jsonl file or folder, or a Hub name")
    data.add_argument("--max-examples", type=int, default=None, help="train on a fixed subset (quick runs)")
    data.add_argument("--max-length", type=int, default=256, help="tokens of prompt + answer")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--warmup-steps", type=int, default=20)
    train.add_argument("--center-rewards", type=float, default=0.01, help="coefficient of (r_c + r_r)^2; 0 = off")
    train.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/reward"))
    out.add_argument("--results", type=Path, default=None, help="also write reward_model.md/.json here")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("max_steps", "batch_size", "max_length", "rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.lr <= 0 or args.center_rewards < 0:
        raise ValueError(f"--lr={args.lr} must be positive and --center-rewards={args.center_rewards} not negative")


@torch.no_grad()
def rewards(model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """The reward model's score of each conversation (chat template applied, truncated to `max_length`): (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(conversations), batch_size):
        ids = [
            tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)[:max_length]
            for c in conversations[start : start + batch_size]
        ]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)  # right-padded, with a mask
        scores.append(model(**batch).logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(scores)


def pairwise_accuracy(model, tokenizer, rows, max_length: int) -> dict:
    """Share of held-out pairs where r(chosen) > r(rejected), overall and per `kind`, and the margins."""
    chosen = rewards(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], max_length)
    rejected = rewards(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], max_length)
    margins = chosen - rejected
    correct = margins > 0
    kinds = [r.get("kind", "all") for r in rows]
    by_kind = {
        k: correct[[i for i, x in enumerate(kinds) if x == k]].float().mean().item() for k in sorted(set(kinds))
    }
    return {
        "accuracy": correct.float().mean().item(),
        "by_kind": by_kind,
        "margins": margins.tolist(),
        "mean_chosen": chosen.mean().item(),
        "mean_rejected": rejected.mean().item(),
    }


def plot_margins(before: list[float], after: list[float], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(before, bins=40, alpha=0.5, label="before training (random score head)")
    ax.hist(after, bins=40, alpha=0.7, label="after training")
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("reward margin r(chosen) - r(rejected), held-out pairs")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def reward_config(args: argparse.Namespace):
    from trl import RewardConfig

    return RewardConfig(
        output_dir=str(args.out / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_length=args.max_length,
        center_rewards_coefficient=args.center_rewards or None,
        logging_steps=10,
        seed=args.seed,
        **trl_defaults(),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    from trl import RewardTrainer

    path = model_path("--model", args.model)
    data = load_preference_dataset(args.data, max_examples=args.max_examples)  # bad rows fail here, before loading
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"--model {args.model}: the tokenizer has no chat template to format the conversations with")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"--model {args.model}: the tokenizer has no pad token, which batching rewards needs")
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
        trust_remote_code=args.trust_remote_code,
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig, TaskType

        peft_config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            task_type=TaskType.SEQ_CLS,
            target_modules="all-linear",
            modules_to_save=["score"],
        )
    fits = [
        max(
            len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=False))
            for side in ("chosen", "rejected")
        )
        <= args.max_length
        for row in data["train"]
    ]
    if not any(fits):
        raise ValueError(f"every training pair is longer than --max-length={args.max_length} tokens: raise it")
    print(
        f"{sum(fits):,} of {len(fits):,} training pairs fit in {args.max_length} tokens (RewardTrainer drops the rest)"
    )
    held_out = list(data["test"])
    start = time.perf_counter()
    before = pairwise_accuracy(model, tokenizer, held_out, args.max_length)
    print(f"held-out pairwise accuracy before training: {before['accuracy']:.1%}")
    trainer = RewardTrainer(
        model=model,
        args=reward_config(args),
        train_dataset=data["train"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    model = trainer.model
    if args.lora:
        model = model.merge_and_unload()
    after = pairwise_accuracy(model, tokenizer, held_out, args.max_length)
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out pairwise accuracy after training: {after['accuracy']:.1%} ({minutes:.1f} min)")

    args.out.mkdir(parents=True, exist_ok=True)
    out_model = args.out / "model"
    tiny_hf.save_model(model, tokenizer, out_model)
    plot_margins(before["margins"], after["margins"], args.out / "margins.png")
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    figures = {
        "model": args.model,
        "data": args.data,
        "lora": args.lora,
        "train_pairs": len(data["train"]),
        "held_out_pairs": len(held_out),
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "minutes": round(minutes, 2),
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "goal": ACCURACY_GOAL,
        "before": {k: v for k, v in before.items() if k != "margins"},
        "after": {k: v for k, v in after.items() if k != "margins"},
        "median_margin_after": float(torch.tensor(after["margins"]).median()),
    }
    table = summary_markdown(figures)
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "summary.md").write_text(table)
    if args.results is not None:
        write_results("reward_model", figures, table, args.results)
        plot_margins(before["margins"], after["margins"], args.results / "reward_margins.png")
    print(table)
    return figures


def summary_markdown(figures: dict) -> str:
    before, after = figures["before"], figures["after"]
    kinds = sorted(after["by_kind"])
    met = "met" if after["accuracy"] >= figures["goal"] else "missed"
    lines = [
        f"# Reward model: {figures['model']} on `{figures['data']}`",
        "",
        f"{figures['train_pairs']:,} training pairs, {figures['max_steps']} steps of {figures['batch_size']} pairs, "
        f"lr {figures['lr']}{', LoRA' if figures['lora'] else ', full fine-tune'}, {figures['minutes']:.1f} minutes. "
        f"Held out: {figures['held_out_pairs']} pairs from modules no earlier stage trained on.",
        "",
        "| | accuracy | " + " | ".join(kinds) + " | mean r(chosen) | mean r(rejected) |",
        "|---|---:|" + "---:|" * len(kinds) + "---:|---:|",
    ]
    for name, m in (("before training", before), ("after training", after)):
        cells = " | ".join(f"{m['by_kind'].get(k, float('nan')):.1%}" for k in kinds)
        lines.append(f"| {name} | {m['accuracy']:.1%} | {cells} | {m['mean_chosen']:.2f} | {m['mean_rejected']:.2f} |")
    lines += [
        "",
        f"Goal: held-out accuracy >= {figures['goal']:.0%}: {met}. Median margin after training: "
        f"{figures['median_margin_after']:.2f}. Margins: `margins.png`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
