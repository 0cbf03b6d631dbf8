"""Supervised fine-tuning (SFT): teach a pretrained run to answer questions, with TRL's `SFTTrainer`.

    tiny-hf sft --model runs/demo --out runs/sft                          # the embedded docstring Q&A
    tiny-hf sft --model runs/demo --data chats.jsonl --max-steps 1000 --learning-rate 5e-4
    accelerate launch -m alignment.sft --model runs/demo --out runs/sft   # several processes / GPUs

Options: every field of TRL's `SFTConfig` (`--max-steps`, `--per-device-train-batch-size`, `--learning-rate`,
`--max-length`, `--packing-strategy`, ...; `--config file.yaml` too) and this stage's own (`SFTOptions`). The
project's defaults where they differ from TRL's are `DEFAULTS` (and `alignment.trl_defaults`).
Logs: `--report-to` (training/trackers.py), TensorBoard in `<out>/tb` by default, or trackio, wandb, none.

The chat template (ChatML, with `{% generation %}` markers around assistant turns) turns each conversation into
tokens, and the loss counts only the assistant's tokens (`assistant_only_loss`): the model learns to answer, not to
ask. Conversations are packed into `--max-length` rows without padding (`packing_strategy="bfd"`): TRL marks where
each one starts by restarting `position_ids`, and the model keeps attention inside each conversation from them
(tiny_hf's attention does; check a model you bring, see FACTS on padding-free packing).

Reports the held-out assistant-token loss before and after, and greedy answers to held-out questions side by side
(generated with `tiny_hf.chat`), in `<out>/summary.md`; `--results bench/results` also writes `sft.md`/`.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf
from alignment import place_trainer_output, trl_defaults, write_summary
from alignment.data import exact_match_reward, load_chat_dataset
from tiny_hf.chat import chat_generate
from tiny_hf.options import parse_options
from tiny_hf.results import markdown_cell
from tiny_hf.runs import model_path
from training.model_card import record_stage
from training.trackers import trainer_tensorboard_dir

# SFTConfig fields whose project default differs from TRL's (with alignment.trl_defaults): what a run on the demo
# model needs; `max_length` is also capped at the model's window.
DEFAULTS = {
    "max_steps": 300,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "max_length": 256,
    "assistant_only_loss": True,
    "packing": True,
}


@dataclass
class SFTOptions:
    """This stage's own options; the trainer's are TRL's `SFTConfig`."""

    model: str = field(default="runs/demo", metadata={"help": "a run folder, a model folder or a Hub id"})
    data: str = field(default="embedded", metadata={"help": "embedded, a .json/.jsonl file or folder, or a Hub name"})
    max_examples: int | None = field(default=None, metadata={"help": "train on a fixed subset (quick runs)"})
    eval_examples: int = field(default=200, metadata={"help": "held-out conversations for the loss"})
    samples: int = field(default=5, metadata={"help": "held-out questions answered before and after"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per generated answer"})
    out: Path = field(default=Path("runs/sft"), metadata={"help": "model/, summary.md and the trainer's files"})
    results: Path | None = field(default=None, metadata={"help": "also write sft.md/.json here (bench/results)"})


def parse_args(argv: list[str] | None = None):
    """(SFTOptions, SFTConfig) from the command line (and `--config`), with the project's defaults."""
    from trl import SFTConfig

    options, config = parse_options(
        SFTOptions, SFTConfig, argv=argv, description=__doc__, defaults={**trl_defaults(), **DEFAULTS}
    )
    place_trainer_output(config, options.out)
    return options, config


@torch.no_grad()
def assistant_loss(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over the assistant tokens of `conversations`, as SFT's loss counts them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, count = 0.0, 0
    for start in range(0, len(conversations), batch_size):
        rows = []
        for messages in conversations[start : start + batch_size]:
            enc = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            rows.append((enc["input_ids"], enc["assistant_masks"]))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, assistant) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, : len(row)] = torch.where(torch.tensor(assistant, dtype=torch.bool), torch.tensor(row), -100)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        )
        nats += loss.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return nats / max(count, 1)


def answer(model, tokenizer, questions: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts (the conversation without its last assistant turn)."""
    return [reply.text for reply in chat_generate(model, tokenizer, questions, max_new_tokens=max_new_tokens)]


# ---------------------------------------------------------------------------------------------------------------------
# The stage: setup, evaluate, train, finish
# ---------------------------------------------------------------------------------------------------------------------
def load_model(options: SFTOptions, config):
    """The model and tokenizer to fine-tune; the tokenizer's template must mark assistant turns for the loss."""
    try:
        path = model_path("--model", options.model)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=config.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tokenizer.chat_template is None or "generation" not in tokenizer.chat_template:
        raise SystemExit(
            "error: the tokenizer's chat template has no {% generation %} markers, which "
            "assistant-only loss needs (TinyTokenizerFast's template has them)"
        )
    config.max_length = min(config.max_length, model.config.max_position_embeddings)
    return model, tokenizer


def held_out_sets(test, eval_examples: int) -> dict:
    """The held-out docs conversations (for the loss and the samples) and verifiable rows (for exact match)."""
    rows = list(test)
    return {
        "docs": [row["messages"] for row in rows if row.get("task", "docs") == "docs"][:eval_examples],
        "verifiable": [row for row in rows if row.get("task") == "verifiable"][:eval_examples],
    }


def evaluate(model, tokenizer, held_out: dict, options: SFTOptions) -> dict:
    """Held-out assistant loss, greedy exact match on the verifiable questions (None without any) and greedy
    answers to the first `--samples` docs questions."""
    verifiable = held_out["verifiable"]
    exact_match = None
    if verifiable:
        answers = answer(model, tokenizer, [r["messages"][:-1] for r in verifiable], options.max_new_tokens)
        exact_match = sum(exact_match_reward(answers, [r["module"] for r in verifiable])) / len(verifiable)
    questions = [m[:-1] for m in held_out["docs"][: options.samples]]
    return {
        "loss": assistant_loss(model, tokenizer, held_out["docs"]),
        "exact_match": exact_match,
        "answers": answer(model, tokenizer, questions, options.max_new_tokens),
    }


def train(model, tokenizer, train_dataset, config):
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> dict:
    options, config = parse_args(argv)
    model, tokenizer = load_model(options, config)
    data = load_chat_dataset(options.data, max_examples=options.max_examples)
    held_out = held_out_sets(data["validation"], options.eval_examples)

    start = time.perf_counter()
    before = evaluate(model, tokenizer, held_out, options)
    print(f"held-out assistant loss before SFT: {before['loss']:.3f}")
    with trainer_tensorboard_dir(options.out):
        trainer = train(model, tokenizer, data["train"], config)
    after = evaluate(trainer.model, tokenizer, held_out, options)
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out assistant loss after SFT: {after['loss']:.3f} ({minutes:.1f} min)")

    tiny_hf.save_model(trainer.model, tokenizer, options.out / "model")
    figures = summary_figures(options, config, data, held_out, before, after, trainer, minutes)
    write_summary("sft", figures, summary_markdown(figures), options.out, options.results)
    record_stage(options.out, "sft", options, config)
    return figures


def summary_figures(options, config, data, held_out, before, after, trainer, minutes: float) -> dict:
    samples = held_out["docs"][: options.samples]
    train_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "model": options.model,
        "data": options.data,
        "train_conversations": len(data["train"]),
        "held_out_conversations": len(held_out["docs"]),
        "max_steps": config.max_steps,
        "batch_size": config.per_device_train_batch_size,
        "max_length": config.max_length,
        "packing": config.packing_strategy if config.packing else "none",
        "lr": config.learning_rate,
        "minutes": round(minutes, 2),
        "held_out_loss_before": before["loss"],
        "held_out_loss_after": after["loss"],
        "verifiable_held_out": len(held_out["verifiable"]),
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "first_train_loss": train_losses[0] if train_losses else None,
        "last_train_loss": train_losses[-1] if train_losses else None,
        "samples": [
            {"question": m[-2]["content"], "reference": m[-1]["content"], "before": b, "after": a}
            for m, b, a in zip(samples, before["answers"], after["answers"], strict=True)
        ],
    }


def summary_markdown(figures: dict) -> str:
    lines = [
        f"# SFT: {figures['model']} on `{figures['data']}`",
        "",
        f"{figures['train_conversations']:,} training conversations, {figures['max_steps']} steps of "
        f"{figures['batch_size']} packed rows of {figures['max_length']} tokens ({figures['packing']} packing), "
        f"lr {figures['lr']}, {figures['minutes']:.1f} minutes. Loss on assistant tokens only.",
        "",
        "| | held-out assistant loss (nats/token) |",
        "|---|---:|",
        f"| before SFT | {figures['held_out_loss_before']:.3f} |",
        f"| after SFT | {figures['held_out_loss_after']:.3f} |",
        *(
            [
                "",
                f"Verifiable questions of `{figures['data']}` ({figures['verifiable_held_out']} held-out), "
                f"greedy exact match: {figures['exact_match_before']:.1%} before, {figures['exact_match_after']:.1%} "
                "after.",
            ]
            if figures.get("exact_match_after") is not None
            else []
        ),
        "",
        f"Greedy answers to held-out questions ({figures['held_out_conversations']} held-out conversations come from "
        "modules that pretraining also held out):",
        "",
        "| question | reference | before | after |",
        "|---|---|---|---|",
    ]
    for s in figures["samples"]:
        cells = [markdown_cell(s[key], 200) for key in ("question", "reference", "before", "after")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
