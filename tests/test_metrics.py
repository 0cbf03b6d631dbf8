"""training/metrics: the local `evaluate` module for loss, perplexity and bits per byte loads offline from any
directory, matches hand-computed values and torch's cross-entropy, combines batches exactly, and refuses empty
input with a clear error."""

import math
from pathlib import Path

import evaluate
import pytest
import torch
import torch.nn.functional as F

from tiny_hf.metrics import LM_METRICS_PATH, load_lm_metric

ROOT = Path(__file__).resolve().parent.parent
LOSSES = [2.0, 3.5, 1.25, 10.0]  # summed nats per row
TOKENS = [1, 2, 3, 4]
BYTES = [5, 6, 7, 16]


def test_hand_computed_values():
    metric = load_lm_metric()
    metric.add_batch(losses=LOSSES, num_tokens=TOKENS, num_bytes=BYTES)
    result = metric.compute()
    loss = 16.75 / 10
    assert result["loss"] == pytest.approx(loss)
    assert result["perplexity"] == pytest.approx(math.exp(loss))
    assert result["bits_per_byte"] == pytest.approx(16.75 / math.log(2) / 34)
    assert (result["num_tokens"], result["num_bytes"]) == (10, 34)


def test_loss_is_torch_cross_entropy_and_perplexity_its_exp():
    logits, targets = torch.randn(3, 7, 50, dtype=torch.float64), torch.randint(0, 50, (3, 7))
    metric = load_lm_metric()
    for row_logits, row_targets in zip(logits, targets, strict=True):  # a row per sequence, as in training
        nats = F.cross_entropy(row_logits, row_targets, reduction="sum").item()
        metric.add(losses=nats, num_tokens=row_targets.numel(), num_bytes=4 * row_targets.numel())
    result = metric.compute()
    mean = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1)).item()
    assert result["loss"] == pytest.approx(mean, rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(mean / math.log(2) / 4, rel=1e-12)  # 4 bytes per token


def test_batches_combine_to_one_compute():
    batched = load_lm_metric()
    for i in range(0, len(LOSSES), 2):
        batched.add_batch(losses=LOSSES[i : i + 2], num_tokens=TOKENS[i : i + 2], num_bytes=BYTES[i : i + 2])
    at_once = load_lm_metric().compute(losses=LOSSES, num_tokens=TOKENS, num_bytes=BYTES)
    assert batched.compute() == pytest.approx(at_once)


def test_compute_empties_the_metric_for_the_next_evaluation():
    metric = load_lm_metric()
    metric.add(losses=100.0, num_tokens=10, num_bytes=40)
    metric.compute()
    metric.add(losses=2.0, num_tokens=1, num_bytes=1)
    assert metric.compute()["loss"] == pytest.approx(2.0)


def test_empty_input_raises_a_clear_error():
    metric = load_lm_metric()
    metric.add(losses=0.0, num_tokens=0, num_bytes=0)
    with pytest.raises(ValueError, match="no predicted tokens"):
        metric.compute()
    with pytest.raises(ValueError, match="nothing to compute"):
        load_lm_metric().compute()
    with pytest.raises(ValueError, match="num_bytes sums to 0"):
        load_lm_metric().compute(losses=[1.0], num_tokens=[2], num_bytes=[0])


def test_a_diverged_model_has_infinite_perplexity():
    result = load_lm_metric().compute(losses=[1000.0], num_tokens=[1], num_bytes=[1])
    assert result["perplexity"] == math.inf and result["loss"] == 1000.0


def test_loads_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_lm_metric().compute(losses=[2.0], num_tokens=[1], num_bytes=[1])["loss"] == 2.0
    monkeypatch.chdir(ROOT)
    relative = evaluate.load("tiny_hf/metrics/lm_metrics.py", keep_in_memory=True)  # the documented spelling
    assert relative.compute(losses=[3.0], num_tokens=[1], num_bytes=[1])["loss"] == 3.0


def test_on_disk_cache_mode_works(tmp_path):
    """keep_in_memory=False is evaluate's default (Arrow files + locks under cache_dir); the metric works there too."""
    metric = evaluate.load(str(LM_METRICS_PATH), cache_dir=str(tmp_path))
    metric.add_batch(losses=LOSSES, num_tokens=TOKENS, num_bytes=BYTES)
    assert metric.compute()["loss"] == pytest.approx(1.675)
