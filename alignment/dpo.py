"""Direct preference optimization (DPO): prefer the chosen answers of preference pairs, against the SFT model, with
TRL's `DPOTrainer`.

    python alignment/dpo.py --model runs/sft --out runs/dpo                        # the embedded docs preferences
    python alignment/dpo.py --model runs/sft --out runs/dpo-lora --lora            # LoRA: no second model in memory
    python alignment/dpo.py --model runs/sft --loss-type ipo --beta 0.5            # another loss TRL's DPOConfig knows
    accelerate launch alignment/dpo.py --model runs/sft --data prefs.jsonl         # any TRL preference data

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

import argparse
import json
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf
from alignment import trl_defaults
from alignment.data import load_preference_dataset
from tiny_hf.results import write_results
from tiny_hf.runs import model_path

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="runs/sft", help="the SFT run (a run folder, model folder or Hub id)")
    model.add_argument("--lora", action="store_true", help="train LoRA adapters; the reference = adapters off")
    model.add_argument("--rank", type=int, default=16)
    model.add_argument("--trust-remote-code", action="store_true")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="embedded", help="embedded, a .json/.jsonl file or folder, or a Hub name")
    data.add_argument("--max-examples", type=int, default=None, help="train on a fixed subset (quick runs)")
    data.add_argument("--max-length", type=int, default=256, help="tokens of prompt + answer (longer: truncated)")
    train = parser.add_argument_group("training")
    train.add_argument("--loss-type", default="sigmoid", help="a loss type of TRL's DPOConfig (sigmoid = DPO)")
    train.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="robust / exo_pair losses only")
    train.add_argument("--max-steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=5e-5)
    train.add_argument("--warmup-steps", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    report = parser.add_argument_group("report")
    report.add_argument("--eval-examples", type=int, default=500, help="held-out pairs for the accuracy")
    report.add_argument("--logging-steps", type=int, default=10)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/dpo"))
    out.add_argument("--results", type=Path, default=None, help="also write dpo.md/.json here (bench/results)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    valid = loss_types()
    if args.loss_type not in valid:
        raise ValueError(f"--loss-type={args.loss_type!r} is not one of {valid} (TRL's DPOConfig)")
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "rank", "eval_examples", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if not args.beta > 0:
        raise ValueError(f"--beta={args.beta} must be > 0 (it scales the implicit reward)")
    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr} must be > 0")
    if args.loss_type == "exo_pair" and args.label_smoothing <= 0:
        raise ValueError("--loss-type=exo_pair needs --label-smoothing > 0 (the EXO paper uses 1e-3)")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing={args.label_smoothing} must be in [0, 0.5)")


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


def dpo_config(args: argparse.Namespace):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(args.out / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_length=args.max_length,
        loss_type=[args.loss_type],
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        logging_steps=args.logging_steps,
        seed=args.seed,
        **trl_defaults(),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    from trl import DPOTrainer

    path = model_path("--model", args.model)
    data = load_preference_dataset(args.data, max_examples=args.max_examples)  # bad rows fail here, before loading
    data = data.map(explicit_prompt)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"--model {args.model}: the tokenizer has no chat template to format the conversations with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    load = dict(dtype=dtype, trust_remote_code=args.trust_remote_code)
    # Loaded from the folder (not built in memory): TRL rebuilds anything it needs from config._name_or_path.
    model = AutoModelForCausalLM.from_pretrained(path, **load)
    peft_config, ref_model = None, None
    if args.lora:
        from peft import LoraConfig, TaskType

        peft_config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            task_type=TaskType.CAUSAL_LM,
            target_modules="all-linear",
        )
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(path, **load).eval()
        ref_model.requires_grad_(False)
    held_out = list(data["test"].select(range(min(args.eval_examples, len(data["test"])))))

    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_config(args),
        train_dataset=data["train"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    model = trainer.model
    reference = model.disable_adapter if args.lora else ref_model
    after = preference_accuracy(model, reference, tokenizer, held_out, args.beta, args.max_length)
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out implicit-reward accuracy after DPO: {after['accuracy']:.1%} ({minutes:.1f} min)")

    if args.lora:
        model = model.merge_and_unload()
    args.out.mkdir(parents=True, exist_ok=True)
    out_model = args.out / "model"
    tiny_hf.save_model(model, tokenizer, out_model)
    log = [{k: r[k] for k in ("step", *LOGGED) if k in r} for r in trainer.state.log_history if "loss" in r]
    figures = {
        "model": args.model,
        "data": args.data,
        "lora": args.lora,
        "loss_type": args.loss_type,
        "beta": args.beta,
        "train_pairs": len(data["train"]),
        "held_out_pairs": len(held_out),
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "minutes": round(minutes, 2),
        "first_log": log[0] if log else None,
        "last_log": log[-1] if log else None,
        "log": log,
        "held_out": after,
    }
    table = summary_markdown(figures)
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "summary.md").write_text(table)
    if args.results is not None:
        write_results("dpo", figures, table, args.results)
    print(table)
    return figures


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
    main()
