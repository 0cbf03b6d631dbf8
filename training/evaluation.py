"""Validation loss, perplexity and bits per byte of any causal LM on a run's held-out documents.

The measure every later stage reports against its base run (fine-tuning, quantization, pruning): the same
validation blocks the run was evaluated on during pretraining (rebuilt from its `run_config.json`), the same
`evaluate` metric module. `document_bits_per_byte` scores whole documents the way lm-evaluation-harness's
`loglikelihood_rolling` does, so `tiny-hf eval` (alignment/harness.py) can show the two agree.

    from training.evaluation import validation_set, evaluate_lm
    blocks, byte_lengths = validation_set("runs/demo", tokenizer)
    print(evaluate_lm(model, blocks, byte_lengths))  # val_loss, val_perplexity, val_bits_per_byte
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tiny_hf.metrics import load_lm_metric
from training.data import load_documents, parse_data_spec, token_byte_lengths
from training.run_log import read_run_config
from training.shards import validation_blocks


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
    blocks = validation_blocks(
        config["data"],
        tokenizer,
        config["block_size"],
        val_fraction=config.get("val_fraction", 0.05),
        cache_dir=config.get("cache_dir", "data"),
    )
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


def validation_documents(run_dir: str | Path) -> list[str]:
    """The held-out documents of a pretraining run folder (every source of its data spec), as text."""
    config = read_run_config(run_dir)
    texts = []
    for source, _ in parse_data_spec(config["data"]):
        docs = load_documents(
            source, val_fraction=config.get("val_fraction", 0.05), cache_dir=config.get("cache_dir", "data")
        )
        texts += list(docs["validation"]["text"])
    return texts


@torch.no_grad()
def document_bits_per_byte(model, tokenizer, texts: list[str], window: int, prefix_token_id: int) -> float:
    """Bits per UTF-8 byte of `texts`, each scored alone after `prefix_token_id` in windows of `window` tokens that
    predict disjoint spans, the last one with the tokens before it as context: lm-evaluation-harness's rolling
    loglikelihood (context 1). -sum(log p) / bytes / ln 2."""
    model.eval()
    device = next(model.parameters()).device
    nats, num_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        inputs = [prefix_token_id, *ids]  # inputs[j] is the token before ids[j]
        for start in range(0, len(ids), window):
            end = min(start + window, len(ids))
            context = max(0, end - window)
            logits = model(input_ids=torch.tensor([inputs[context:end]], device=device), use_cache=False).logits
            targets = torch.tensor(ids[start:end], device=device)
            nats += F.cross_entropy(logits[0, start - context :].float(), targets, reduction="sum").item()
        num_bytes += len(text.encode("utf-8"))
    return nats / num_bytes / math.log(2)
