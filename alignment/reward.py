"""Reward model: a scalar score that prefers the chosen answer of a preference pair, with TRL's `RewardTrainer`.

    tiny-hf reward --model runs/sft --out runs/reward                       # the embedded docs preferences
    tiny-hf reward --model runs/sft --out runs/reward-lora --lora           # LoRA, score head in full
    accelerate launch -m alignment.reward --model runs/sft --data prefs.jsonl   # any TRL preference data

Options: every field of TRL's `RewardConfig` (`--max-steps`, `--per-device-train-batch-size`, `--learning-rate`,
`--max-length`, `--center-rewards-coefficient`, ...; `--config file.yaml` too) and this stage's own
(`RewardOptions`); the project's defaults where they differ from TRL's are `DEFAULTS`.
Logs: `--report-to` (training/trackers.py), TensorBoard in `<out>/tb` by default, or trackio, wandb, none.

The model is the SFT run loaded as `AutoModelForSequenceClassification` with one label: the causal LM's body and a
new `score` head read at the last real token (TinyForSequenceClassification). The loss is Bradley-Terry's
-log sigmoid(r_chosen - r_rejected) (Ouyang et al. 2022, Sec. 3.5): only reward differences are learned, so
`--center-rewards-coefficient` adds a small penalty on (r_chosen + r_rejected)^2 to keep the scores near 0
(Eisenstein et al. 2023), which PPO's KL-penalised reward is sensitive to.

Reports held-out pairwise accuracy (overall and per kind of rejected answer; goal >= 90%) and a histogram of the
reward margins r_chosen - r_rejected (`margins.png`) in `<out>/summary.md`; `--results bench/results` also writes
`reward_model.md`/`.json`. The model is exported to `<out>/model` (with LoRA: merged), where
`AutoModelForSequenceClassification.from_pretrained` loads it, with or without tiny_hf installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tiny_hf
from alignment import check_at_least_one, lora_config, place_trainer_output, trl_defaults, write_summary
from alignment.data import load_preference_dataset
from tiny_hf.options import parse_options
from tiny_hf.runs import model_path
from training.model_card import record_stage
from training.trackers import trainer_tensorboard_dir

ACCURACY_GOAL = 0.9
# RewardConfig fields whose project default differs from TRL's (with alignment.trl_defaults).
DEFAULTS = {
    "max_steps": 300,
    "per_device_train_batch_size": 16,
    "learning_rate": 5e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "max_length": 256,
    "center_rewards_coefficient": 0.01,
}


@dataclass
class RewardOptions:
    """This stage's own options; the trainer's are TRL's `RewardConfig`."""

    model: str = field(default="runs/sft", metadata={"help": "the SFT run (a run folder, model folder or Hub id)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (r=--rank) and the score head"})
    rank: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2 x rank)"})
    data: str = field(default="embedded", metadata={"help": "embedded, a .json/.jsonl file or folder, or a Hub name"})
    max_examples: int | None = field(default=None, metadata={"help": "train on a fixed subset (quick runs)"})
    out: Path = field(default=Path("runs/reward"), metadata={"help": "model/, summary.md, margins.png"})
    results: Path | None = field(default=None, metadata={"help": "also write reward_model.md/.json here"})


def parse_args(argv: list[str] | None = None):
    """(RewardOptions, RewardConfig) from the command line (and `--config`), with the project's defaults, checked."""
    from trl import RewardConfig

    options, config = parse_options(
        RewardOptions, RewardConfig, argv=argv, description=__doc__, defaults={**trl_defaults(), **DEFAULTS}
    )
    place_trainer_output(config, options.out)
    check_at_least_one(
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        max_length=config.max_length,
        rank=options.rank,
    )
    centering = config.center_rewards_coefficient
    if config.learning_rate <= 0 or (centering is not None and centering < 0):
        raise ValueError(
            f"--learning-rate={config.learning_rate} must be positive and "
            f"--center-rewards-coefficient={centering} not negative"
        )
    return options, config


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


# ---------------------------------------------------------------------------------------------------------------------
# The stage: setup, evaluate, train, finish
# ---------------------------------------------------------------------------------------------------------------------
def load_model(options: RewardOptions, config):
    """The SFT run with a new one-label score head, its tokenizer, and the LoRA config (or None)."""
    path = model_path("--model", options.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"--model {options.model}: the tokenizer has no chat template to format the conversations with"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"--model {options.model}: the tokenizer has no pad token, which batching rewards needs")
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
        trust_remote_code=config.trust_remote_code,
    )
    peft_config = lora_config(options.rank, "SEQ_CLS", modules_to_save=["score"]) if options.lora else None
    return model, tokenizer, peft_config


def check_lengths(tokenizer, train_dataset, max_length: int) -> None:
    """Fail when no training pair fits in `max_length` tokens (RewardTrainer drops those that do not)."""
    fits = [
        max(
            len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=False))
            for side in ("chosen", "rejected")
        )
        <= max_length
        for row in train_dataset
    ]
    if not any(fits):
        raise ValueError(f"every training pair is longer than --max-length={max_length} tokens: raise it")
    print(f"{sum(fits):,} of {len(fits):,} training pairs fit in {max_length} tokens (RewardTrainer drops the rest)")


def train(model, tokenizer, peft_config, train_dataset, config):
    from trl import RewardTrainer

    trainer = RewardTrainer(
        model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> dict:
    options, config = parse_args(argv)
    data = load_preference_dataset(options.data, max_examples=options.max_examples)  # bad rows fail before loading
    model, tokenizer, peft_config = load_model(options, config)
    check_lengths(tokenizer, data["train"], config.max_length)
    held_out = list(data["validation"])

    start = time.perf_counter()
    before = pairwise_accuracy(model, tokenizer, held_out, config.max_length)
    print(f"held-out pairwise accuracy before training: {before['accuracy']:.1%}")
    with trainer_tensorboard_dir(options.out):
        trainer = train(model, tokenizer, peft_config, data["train"], config)
    model = trainer.model.merge_and_unload() if options.lora else trainer.model
    after = pairwise_accuracy(model, tokenizer, held_out, config.max_length)
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out pairwise accuracy after training: {after['accuracy']:.1%} ({minutes:.1f} min)")

    tiny_hf.save_model(model, tokenizer, options.out / "model")
    plot_margins(before["margins"], after["margins"], options.out / "margins.png")
    figures = summary_figures(options, config, data, held_out, before, after, trainer, minutes)
    write_summary("reward_model", figures, summary_markdown(figures), options.out, options.results)
    record_stage(options.out, "reward", options, config)
    if options.results is not None:
        plot_margins(before["margins"], after["margins"], options.results / "reward_margins.png")
    return figures


def summary_figures(options, config, data, held_out, before, after, trainer, minutes: float) -> dict:
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "model": options.model,
        "data": options.data,
        "lora": options.lora,
        "train_pairs": len(data["train"]),
        "held_out_pairs": len(held_out),
        "max_steps": config.max_steps,
        "batch_size": config.per_device_train_batch_size,
        "lr": config.learning_rate,
        "minutes": round(minutes, 2),
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "goal": ACCURACY_GOAL,
        "before": {k: v for k, v in before.items() if k != "margins"},
        "after": {k: v for k, v in after.items() if k != "margins"},
        "median_margin_after": float(torch.tensor(after["margins"]).median()),
    }


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
    from tiny_hf.cli import run_main

    run_main(main)
