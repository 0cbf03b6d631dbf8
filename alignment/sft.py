"""Supervised fine-tuning (SFT): teach a pretrained run to answer questions, with TRL's `SFTTrainer`.

    python alignment/sft.py --model runs/demo --out runs/sft                 # the embedded docstring Q&A
    python alignment/sft.py --model runs/demo --data chats.jsonl --max-steps 1000
    accelerate launch alignment/sft.py --model runs/demo --out runs/sft    # several processes / GPUs

The chat template (ChatML, with `{% generation %}` markers around assistant turns) turns each conversation into
tokens, and the loss counts only the assistant's tokens (`assistant_only_loss`): the model learns to answer, not to
ask. Conversations are packed into `--max-length` rows without padding (`packing_strategy="bfd"`): TRL marks where
each one starts by restarting `position_ids`, and the model keeps attention inside each conversation from them
(tiny_hf's attention does; check a model you bring, see FACTS on padding-free packing).

Reports the held-out assistant-token loss before and after, and greedy answers to held-out questions side by side
(generated with tiny_hf's engine), in `<out>/summary.md`; `--results bench/results` also writes `sft.md`/`.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf
from alignment import trl_defaults
from alignment.data import exact_match_reward, load_chat_dataset
from tiny_hf.engine import Engine, SamplingParams
from tiny_hf.results import markdown_cell, write_results
from tiny_hf.runs import model_path

IM_END = "<|im_end|>"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="runs/demo", help="a run folder, a model folder or a Hub id")
    model.add_argument("--trust-remote-code", action="store_true")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="embedded", help="embedded, a .json/.jsonl file or folder, or a Hub name")
    data.add_argument("--max-examples", type=int, default=None, help="train on a fixed subset (quick runs)")
    data.add_argument("--max-length", type=int, default=256, help="tokens per packed row (at most the window)")
    data.add_argument("--packing", choices=["bfd", "wrapped", "none"], default="bfd")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup-steps", type=int, default=20)
    train.add_argument("--seed", type=int, default=0)
    report = parser.add_argument_group("report")
    report.add_argument("--eval-examples", type=int, default=200, help="held-out conversations for the loss")
    report.add_argument("--samples", type=int, default=5, help="held-out questions answered before and after")
    report.add_argument("--max-new-tokens", type=int, default=48)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/sft"))
    out.add_argument("--results", type=Path, default=None, help="also write sft.md/.json here (bench/results)")
    return parser.parse_args(argv)


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
    """Greedy answers to chat prompts (the conversation without its last assistant turn), through the engine."""
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=max(1, min(32, len(questions))),
        max_queue=max(1, len(questions)),
        window_policy="truncate",
    )
    end = tokenizer.convert_tokens_to_ids(IM_END)
    prompts = [
        tokenizer.apply_chat_template(q, add_generation_prompt=True, tokenize=True, return_dict=False)
        for q in questions
    ]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop_token_ids=[end])
    return [done.text.strip() for done in engine.generate(prompts, params)]


def sft_config(args: argparse.Namespace, max_length: int):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(args.out / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        logging_steps=10,
        seed=args.seed,
        max_length=max_length,
        assistant_only_loss=True,
        packing=args.packing != "none",
        packing_strategy=args.packing if args.packing != "none" else "bfd",
        **trl_defaults(),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    from trl import SFTTrainer

    try:
        path = model_path("--model", args.model)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if tokenizer.chat_template is None or "generation" not in tokenizer.chat_template:
        raise SystemExit(
            "error: the tokenizer's chat template has no {% generation %} markers, which "
            "assistant-only loss needs (TinyTokenizerFast's template has them)"
        )
    max_length = min(args.max_length, model.config.max_position_embeddings)
    data = load_chat_dataset(args.data, max_examples=args.max_examples)
    test = list(data["test"])
    held_out = [row["messages"] for row in test if row.get("task", "docs") == "docs"][: args.eval_examples]
    verifiable = [row for row in test if row.get("task") == "verifiable"][: args.eval_examples]

    def exact_match(model) -> float | None:
        """Held-out share of verifiable questions answered with the defining module (greedy)."""
        if not verifiable:
            return None
        answers = answer(model, tokenizer, [r["messages"][:-1] for r in verifiable], args.max_new_tokens)
        return sum(exact_match_reward(answers, [r["module"] for r in verifiable])) / len(verifiable)

    questions = [m[:-1] for m in held_out[: args.samples]]
    references = [m[-1]["content"] for m in held_out[: args.samples]]

    start = time.perf_counter()
    before = {
        "loss": assistant_loss(model, tokenizer, held_out),
        "exact_match": exact_match(model),
        "answers": answer(model, tokenizer, questions, args.max_new_tokens),
    }
    print(f"held-out assistant loss before SFT: {before['loss']:.3f}")
    trainer = SFTTrainer(
        model=model, args=sft_config(args, max_length), train_dataset=data["train"], processing_class=tokenizer
    )
    trainer.train()
    model = trainer.model
    after = {
        "loss": assistant_loss(model, tokenizer, held_out),
        "exact_match": exact_match(model),
        "answers": answer(model, tokenizer, questions, args.max_new_tokens),
    }
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out assistant loss after SFT: {after['loss']:.3f} ({minutes:.1f} min)")

    out_model = args.out / "model"
    tiny_hf.save_model(model, tokenizer, out_model)
    train_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    figures = {
        "model": args.model,
        "data": args.data,
        "train_conversations": len(data["train"]),
        "held_out_conversations": len(held_out),
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "max_length": max_length,
        "packing": args.packing,
        "lr": args.lr,
        "minutes": round(minutes, 2),
        "held_out_loss_before": before["loss"],
        "held_out_loss_after": after["loss"],
        "verifiable_held_out": len(verifiable),
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "first_train_loss": train_losses[0] if train_losses else None,
        "last_train_loss": train_losses[-1] if train_losses else None,
        "samples": [
            {"question": q[-1]["content"], "reference": ref, "before": b, "after": a}
            for q, ref, b, a in zip(questions, references, before["answers"], after["answers"], strict=True)
        ],
    }
    table = summary_markdown(figures)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "summary.md").write_text(table)
    if args.results is not None:
        write_results("sft", figures, table, args.results)
    print(table)
    return figures


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
                'Verifiable task ("Which module defines `X`?" and "What is 17 + 25?", '
                f"{figures['verifiable_held_out']} held-out questions), "
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
    main()
