"""Direct preference optimization (DPO): prefer the chosen answers of preference pairs, against the SFT model, with
TRL's `DPOTrainer`.

    tiny-hf dpo --model runs/sft --out runs/dpo                         # the embedded docs preferences
    tiny-hf dpo --model runs/sft --out runs/dpo-lora --lora             # LoRA: no second model in memory
    tiny-hf dpo --model runs/sft --loss-type ipo --beta 0.5             # another loss TRL's DPOConfig knows
    accelerate launch -m alignment.dpo --model runs/sft --data prefs.jsonl   # any TRL preference data

Options: every field of TRL's `DPOConfig` (`--loss-type`, `--beta`, `--label-smoothing`, `--max-length`,
`--max-steps`, `--per-device-train-batch-size`, `--learning-rate`, ...; `--config file.yaml` too) and this stage's
own (`DPOOptions`); the project's defaults where they differ from TRL's are `DEFAULTS`.
Logs: `--report-to` (training/trackers.py), TensorBoard in `<out>/tb` by default, or trackio, wandb, none.

DPO (Rafailov et al. 2023) trains the policy pi on pairs (x, y_w, y_l) with -log sigmoid(beta * (h(y_w) - h(y_l))),
where h(y) = log pi(y|x) - log pi_ref(y|x): the reward model of RLHF is implicit, r(x, y) = beta * h(y), and the
reference pi_ref (the SFT model, frozen) keeps the policy near what SFT taught. Two ways to hold the reference:
- full fine-tune: a second copy loaded from the same folder (twice the weights in memory);
- `--lora`: the policy is the SFT model plus LoRA adapters, and the reference is the same model with the adapters
  switched off (PEFT's `disable_adapter()`), so nothing is copied (`ref_model=None` in TRL).

Reports the trainer's logged implicit rewards (chosen, rejected, margin, accuracy), and after training the held-out
preference accuracy by the implicit reward, overall and per kind of rejected answer, in `<out>/summary.md`;
`--results bench/results` also writes `dpo.md`/`.json`. The policy (with LoRA: merged) is exported to `<out>/model`,
where `AutoModelForCausalLM.from_pretrained` loads it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf
from alignment import check_at_least_one, lora_config, place_trainer_output, trl_defaults, write_summary
from alignment.data import load_preference_dataset
from tiny_hf.options import parse_options
from tiny_hf.runs import model_path
from training.model_card import record_stage
from training.trackers import trainer_tensorboard_dir

# What the trainer logs about the implicit reward (TRL's names), kept for the summary.
LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def loss_types() -> list[str]:
    """The loss types TRL's `DPOConfig` accepts, read from its `loss_type` field's help (TRL keeps no list in code:
    `DPOTrainer` fails only on the first training step with an unknown one)."""
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = help_text.split("Possible values are:", 1)[-1].split("If multiple", 1)[0]
    names = re.findall(r"'([a-z_]+)'", listed)
    if not names:  # a TRL version that words it differently: fall back on the 1.16 list
        names = [
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "nca_pair",
            "robust",
            "bco_pair",
            "sppo_hard",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sft",
            "sigmoid_norm",
        ]
    return names


# DPOConfig fields whose project default differs from TRL's (with alignment.trl_defaults).
DEFAULTS = {
    "max_steps": 200,
    "per_device_train_batch_size": 8,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "max_length": 256,
}


@dataclass
class DPOOptions:
    """This stage's own options; the trainer's are TRL's `DPOConfig`."""

    model: str = field(default="runs/sft", metadata={"help": "the SFT run (a run folder, model folder or Hub id)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters; the reference = adapters off"})
    rank: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2 x rank)"})
    data: str = field(default="embedded", metadata={"help": "embedded, a .json/.jsonl file or folder, or a Hub name"})
    max_examples: int | None = field(default=None, metadata={"help": "train on a fixed subset (quick runs)"})
    eval_examples: int = field(default=500, metadata={"help": "held-out pairs for the accuracy"})
    out: Path = field(default=Path("runs/dpo"), metadata={"help": "model/, summary.md and the trainer's files"})
    results: Path | None = field(default=None, metadata={"help": "also write dpo.md/.json here (bench/results)"})


def parse_args(argv: list[str] | None = None):
    """(DPOOptions, DPOConfig) from the command line (and `--config`), with the project's defaults, checked."""
    from trl import DPOConfig

    options, config = parse_options(
        DPOOptions, DPOConfig, argv=argv, description=__doc__, defaults={**trl_defaults(), **DEFAULTS}
    )
    place_trainer_output(config, options.out)
    check_args(options, config)
    return options, config


def check_args(options: DPOOptions, config) -> None:
    """What DPOTrainer would only find out at its first step (or never): unknown losses, a zero beta, ..."""
    model_path("--model", options.model)  # a missing model fails before the data is read
    valid = loss_types()
    for name in config.loss_type:
        if name not in valid:
            raise ValueError(f"--loss-type={name!r} is not one of {valid} (TRL's DPOConfig)")
    check_at_least_one(
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        rank=options.rank,
        eval_examples=options.eval_examples,
    )
    if not config.beta > 0:
        raise ValueError(f"--beta={config.beta} must be > 0 (it scales the implicit reward)")
    if not config.learning_rate > 0:
        raise ValueError(f"--learning-rate={config.learning_rate} must be > 0")
    if "exo_pair" in config.loss_type and config.label_smoothing <= 0:
        raise ValueError("--loss-type=exo_pair needs --label-smoothing > 0 (the EXO paper uses 1e-3)")
    if not 0 <= config.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing={config.label_smoothing} must be in [0, 0.5)")


# ---------------------------------------------------------------------------------------------------------------------
# The implicit reward on held-out pairs: beta * (log pi(y|x) - log pi_ref(y|x)), summed over the answer's tokens as
# DPOTrainer sums them.
# ---------------------------------------------------------------------------------------------------------------------
def encode_pair_side(tokenizer, prompt: list[dict], answer: list[dict], max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer (chat template, cut at `max_length`) and where the answer starts."""
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=False)
    if prompt:
        start = len(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    else:  # the prompt is inside the conversation: score everything after the first token
        start = 1
    return full[:max_length], min(start, max_length - 1)


@torch.no_grad()
def sequence_logps(model, tokenizer, rows: list[tuple[list[int], int]], batch_size: int = 16) -> torch.Tensor:
    """Sum of log pi(token) over the answer tokens of each (ids, answer_start) row: (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        answer = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (row, first) in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            answer[i, first : len(row)] = True
        ids, mask, answer = ids.to(device), mask.to(device), answer.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        sums.append((logps * answer[:, 1:]).sum(dim=1).cpu())
    model.train(was_training)
    return torch.cat(sums)


def preference_accuracy(policy, reference, tokenizer, rows: list[dict], beta: float, max_length: int) -> dict:
    """Held-out accuracy of the implicit DPO reward (chosen's > rejected's), overall and per `kind`, with the mean
    rewards and margin; also how often the policy alone gives the chosen answer the higher log-probability.

    Args:
        policy: The trained model.
        reference: The frozen reference, or a callable that returns a context manager in which `policy` is the
            reference (LoRA: `policy.disable_adapter`).
        rows: Preference rows (`prompt`, `chosen`, `rejected`, optional `kind`).
    """
    chosen = [encode_pair_side(tokenizer, r["prompt"], r["chosen"], max_length) for r in rows]
    rejected = [encode_pair_side(tokenizer, r["prompt"], r["rejected"], max_length) for r in rows]
    policy_c, policy_r = sequence_logps(policy, tokenizer, chosen), sequence_logps(policy, tokenizer, rejected)
    if callable(reference) and not isinstance(reference, torch.nn.Module):
        with reference():
            ref_c, ref_r = sequence_logps(policy, tokenizer, chosen), sequence_logps(policy, tokenizer, rejected)
    else:
        ref_c, ref_r = sequence_logps(reference, tokenizer, chosen), sequence_logps(reference, tokenizer, rejected)
    reward_c, reward_r = beta * (policy_c - ref_c), beta * (policy_r - ref_r)
    correct = reward_c > reward_r
    kinds = [r.get("kind") or "all" for r in rows]
    by_kind = {
        k: correct[[i for i, x in enumerate(kinds) if x == k]].float().mean().item() for k in sorted(set(kinds))
    }
    return {
        "accuracy": correct.float().mean().item(),
        "by_kind": by_kind,
        "mean_reward_chosen": reward_c.mean().item(),
        "mean_reward_rejected": reward_r.mean().item(),
        "mean_margin": (reward_c - reward_r).mean().item(),
        "logp_accuracy_policy": (policy_c > policy_r).float().mean().item(),
        "logp_accuracy_reference": (ref_c > ref_r).float().mean().item(),
    }


def explicit_prompt(row: dict) -> dict:
    """A row whose prompt is implicit (`prompt` == [], the shared opening turns inside chosen and rejected) with the
    shared turns moved into `prompt`: DPOTrainer tokenizes the prompt on its own and cannot template an empty one."""
    if row["prompt"]:
        return row
    shared = 0
    while (
        shared < min(len(row["chosen"]), len(row["rejected"])) - 1 and row["chosen"][shared] == row["rejected"][shared]
    ):
        shared += 1
    if shared == 0:
        raise ValueError(
            "a preference row has no prompt and chosen/rejected share no opening turn: "
            f"{json.dumps(row['chosen'])[:120]}"
        )
    return {
        **row,
        "prompt": row["chosen"][:shared],
        "chosen": row["chosen"][shared:],
        "rejected": row["rejected"][shared:],
    }


# ---------------------------------------------------------------------------------------------------------------------
# The stage: setup, train, evaluate, finish
# ---------------------------------------------------------------------------------------------------------------------
def load_models(options: DPOOptions, config):
    """The policy, its reference (None with LoRA: the adapters off), the LoRA config (or None) and the tokenizer."""
    path = model_path("--model", options.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"--model {options.model}: the tokenizer has no chat template to format the conversations with"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    load = dict(dtype=dtype, trust_remote_code=config.trust_remote_code)
    # Loaded from the folder (not built in memory): TRL rebuilds anything it needs from config._name_or_path.
    model = AutoModelForCausalLM.from_pretrained(path, **load)
    if options.lora:
        return model, None, lora_config(options.rank, "CAUSAL_LM"), tokenizer
    reference = AutoModelForCausalLM.from_pretrained(path, **load).eval()
    reference.requires_grad_(False)
    return model, reference, None, tokenizer


def train(model, reference, peft_config, tokenizer, train_dataset, config):
    from trl import DPOTrainer

    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> dict:
    options, config = parse_args(argv)
    data = load_preference_dataset(options.data, max_examples=options.max_examples)  # bad rows fail before loading
    data = data.map(explicit_prompt)
    model, reference, peft_config, tokenizer = load_models(options, config)
    held_out = list(data["validation"].select(range(min(options.eval_examples, len(data["validation"])))))

    start = time.perf_counter()
    with trainer_tensorboard_dir(options.out):
        trainer = train(model, reference, peft_config, tokenizer, data["train"], config)
    model = trainer.model
    reference = model.disable_adapter if options.lora else reference
    after = preference_accuracy(model, reference, tokenizer, held_out, config.beta, config.max_length)
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out implicit-reward accuracy after DPO: {after['accuracy']:.1%} ({minutes:.1f} min)")

    tiny_hf.save_model(model.merge_and_unload() if options.lora else model, tokenizer, options.out / "model")
    figures = summary_figures(options, config, data, held_out, after, trainer, minutes)
    write_summary("dpo", figures, summary_markdown(figures), options.out, options.results)
    record_stage(options.out, "dpo", options, config)
    return figures


def summary_figures(options, config, data, held_out, after, trainer, minutes: float) -> dict:
    log = [{k: r[k] for k in ("step", *LOGGED) if k in r} for r in trainer.state.log_history if "loss" in r]
    return {
        "model": options.model,
        "data": options.data,
        "lora": options.lora,
        "loss_type": ",".join(config.loss_type),
        "beta": config.beta,
        "train_pairs": len(data["train"]),
        "held_out_pairs": len(held_out),
        "max_steps": config.max_steps,
        "batch_size": config.per_device_train_batch_size,
        "lr": config.learning_rate,
        "minutes": round(minutes, 2),
        "first_log": log[0] if log else None,
        "last_log": log[-1] if log else None,
        "log": log,
        "held_out": after,
    }


def summary_markdown(figures: dict) -> str:
    held = figures["held_out"]
    kinds = sorted(held["by_kind"])
    lines = [
        f"# DPO: {figures['model']} on `{figures['data']}`",
        "",
        f"{figures['train_pairs']:,} training pairs, {figures['max_steps']} steps of {figures['batch_size']} pairs, "
        f"loss `{figures['loss_type']}`, beta {figures['beta']}, lr {figures['lr']}"
        f"{', LoRA (reference = adapters off)' if figures['lora'] else ', full fine-tune (reference = a frozen copy)'}"
        f", {figures['minutes']:.1f} minutes.",
        "",
        "Implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) as the trainer logged it (training batches):",
        "",
        "| step | loss | r(chosen) | r(rejected) | margin | accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in figures["log"]:
        cells = " | ".join(f"{r[k]:.3f}" if k in r else "" for k in LOGGED)
        lines.append(f"| {r.get('step', '')} | {cells} |")
    lines += [
        "",
        f"Held out ({figures['held_out_pairs']} pairs): implicit-reward accuracy {held['accuracy']:.1%} "
        f"(before training every margin is 0), mean margin {held['mean_margin']:.3f}.",
        "",
        "| | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
        "| implicit-reward accuracy | " + " | ".join(f"{held['by_kind'][k]:.1%}" for k in kinds) + " |",
        "",
        f"log pi(chosen) > log pi(rejected): reference {held['logp_accuracy_reference']:.1%}, "
        f"policy {held['logp_accuracy_policy']:.1%}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
