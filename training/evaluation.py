"""Validation loss, perplexity and bits per byte of any causal LM on a run's held-out documents.

The measure every later stage reports against its base run (fine-tuning, quantization, pruning): the same
validation blocks the run was evaluated on during pretraining (rebuilt from its `run_config.json`), the same
`evaluate` metric module.

    tiny-hf eval --model runs/demo                  # the run's own validation blocks
    tiny-hf eval --model runs/sft --run runs/demo   # another model on that run's blocks

    from training.evaluation import validation_set, evaluate_lm
    blocks, byte_lengths = validation_set("runs/demo", tokenizer)
    print(evaluate_lm(model, blocks, byte_lengths))  # val_loss, val_perplexity, val_bits_per_byte
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tiny_hf.metrics import load_lm_metric
from tiny_hf.options import parse_options
from tiny_hf.runs import model_path, resolve_model
from training.data import build_datasets, token_byte_lengths


def validation_set(run_dir: str | Path, tokenizer, max_blocks: int | None = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation blocks (N, block_size) of a pretraining run folder, and each token id's length in bytes.

    Args:
        run_dir: A folder written by training/pretrain.py (it has `run_config.json`).
        tokenizer: The run's tokenizer.
        max_blocks: Keep the first N blocks (what pretraining evaluated on with its default `--eval-blocks`).
    """
    config_path = Path(run_dir) / "run_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a pretraining run folder: it has no run_config.json")
    config = json.loads(config_path.read_text())
    block_size = config["block_size"]
    _, validation = build_datasets(
        config["data"],
        tokenizer,
        block_size,
        seed=config.get("seed", 0),
        val_fraction=config.get("val_fraction", 0.05),
        cache_dir=config.get("cache_dir", "data"),
    )
    blocks = torch.tensor(validation["input_ids"], dtype=torch.long)
    if max_blocks:
        blocks = blocks[:max_blocks]
    return blocks, torch.tensor(token_byte_lengths(tokenizer), dtype=torch.long)


@torch.no_grad()
def loss_sums(
    model, blocks: torch.Tensor, byte_lengths: torch.Tensor, *, batch_size: int = 16, autocast=contextlib.nullcontext
) -> torch.Tensor:
    """Summed next-token loss in nats, target tokens and target bytes over `blocks`: float64 (3,), on CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        with autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        targets = ids[:, 1:]
        nats = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="sum")
        sums += torch.tensor(
            [nats.item(), targets.numel(), byte_lengths[targets.cpu()].sum().item()], dtype=torch.float64
        )
    model.train(was_training)
    return sums


def metrics_from_sums(sums: torch.Tensor) -> dict:
    """Loss, perplexity and bits per byte from (nats, tokens, bytes) through the repo's `evaluate` metric."""
    metric = load_lm_metric()
    metric.add(losses=float(sums[0]), num_tokens=int(sums[1]), num_bytes=int(sums[2]))
    result = metric.compute()
    return {
        "val_loss": result["loss"],
        "val_perplexity": result["perplexity"],
        "val_bits_per_byte": result["bits_per_byte"],
    }


def evaluate_lm(model, blocks: torch.Tensor, byte_lengths: torch.Tensor, batch_size: int = 16) -> dict:
    """Validation loss, perplexity and bits per byte of `model` (any causal LM) over `blocks`."""
    return metrics_from_sums(loss_sums(model, blocks, byte_lengths, batch_size=batch_size))


@dataclass
class EvalOptions:
    model: str = field(default="runs/demo", metadata={"help": "a run folder, a model folder or a Hub id"})
    run: str | None = field(
        default=None, metadata={"help": "the pretraining run whose validation blocks to use (default: --model)"}
    )
    eval_blocks: int = field(default=64, metadata={"help": "validation blocks to score (0: all)"})
    batch_size: int = field(default=16)
    device: str = field(default="cpu")


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(EvalOptions, argv=argv, description=__doc__)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tiny_hf  # noqa: F401 (registers the Auto classes)

    if options.run is not None and not (Path(options.run) / "run_config.json").is_file():
        raise ValueError(f"--run {options.run}: not a pretraining run folder (it has no run_config.json)")
    path, folders = resolve_model(model_path("--model", options.model))
    run_dir = options.run or next((f for f in folders if (f / "run_config.json").is_file()), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(options.device)
    blocks, byte_lengths = validation_set(run_dir, tokenizer, max_blocks=options.eval_blocks or None)
    result = evaluate_lm(model, blocks, byte_lengths, batch_size=options.batch_size)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
