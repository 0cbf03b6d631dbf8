"""Language-model metrics as a local `evaluate` module: loss, perplexity and bits per byte.

Load it with `evaluate.load("tiny_hf/metrics/lm_metrics.py")` (or `tiny_hf.metrics.load_lm_metric()`, which does
not depend on the working directory). Hub metrics such as `evaluate.load("perplexity")` need the network; a local
script does not. `evaluate` copies this file into its modules cache and imports it from there, so it must stand
alone: no imports from tiny_hf or training.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """\
Cross-entropy loss (nats per token), perplexity and bits per byte of a causal language model, from sums.

Bits per byte = total nats / ln(2) / total UTF-8 bytes: the number of bits the model needs to encode the text,
divided by the text's length in bytes. Loss and perplexity are per token, so they depend on the tokenizer: a
tokenizer with longer tokens makes fewer, harder predictions, and its per-token loss rises even when the model
compresses the text just as well. Bits per byte counts the same text under any tokenizer, so it compares models
with different vocabularies (and the same model under different tokenizers) fairly.
"""

_KWARGS_DESCRIPTION = """\
Args:
    losses: One float per row (an evaluated batch or block): the SUM of the token cross-entropies, in nats.
    num_tokens: One int per row: the number of predicted tokens that sum covers.
    num_bytes: One int per row: the number of UTF-8 bytes those predicted tokens decode to.
Returns:
    loss: total nats / total tokens (mean cross-entropy per token, in nats).
    perplexity: exp(loss).
    bits_per_byte: total nats / ln(2) / total bytes.
    num_tokens, num_bytes: the totals.
Example:
    >>> metric = evaluate.load("tiny_hf/metrics/lm_metrics.py")
    >>> metric.add_batch(losses=[2.0, 4.0], num_tokens=[1, 2], num_bytes=[4, 8])
    >>> metric.compute()["loss"]
    2.0
"""

_CITATION = ""


class LMMetrics(evaluate.Metric):
    """Loss, perplexity and bits per byte from per-row sums (nats, tokens, bytes).

    Rows carry sums, not means, so batches of any size and a distributed run's reduced totals combine exactly:
    the result is the token-weighted mean over everything added, not a mean of batch means.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "losses": datasets.Value("float64"),
                    "num_tokens": datasets.Value("int64"),
                    "num_bytes": datasets.Value("int64"),
                }
            ),
        )

    def compute(self, **kwargs) -> dict | None:
        """`evaluate.Metric.compute`, with a clear error where evaluate would fail on an empty buffer."""
        # evaluate's writer exists only once rows were added since the last compute; without rows, evaluate raises
        # an AttributeError (in memory) or a misleading cache-collision error (on disk).
        if self.writer is None and all(kwargs.get(name) is None for name in ("losses", "num_tokens", "num_bytes")):
            raise ValueError("nothing to compute: add rows with add() or add_batch() first (compute() empties them)")
        return super().compute(**kwargs)

    def _compute(self, losses: list[float], num_tokens: list[int], num_bytes: list[int]) -> dict:
        total_nats, total_tokens, total_bytes = math.fsum(losses), sum(num_tokens), sum(num_bytes)
        if min(num_tokens, default=0) < 0 or min(num_bytes, default=0) < 0:
            raise ValueError(f"num_tokens and num_bytes must be >= 0, got {num_tokens} and {num_bytes}")
        if total_tokens == 0:
            raise ValueError(
                f"no predicted tokens: num_tokens sums to 0 over {len(num_tokens)} rows, so the loss is undefined"
            )
        if total_bytes == 0:
            raise ValueError(
                f"num_bytes sums to 0 over {total_tokens} tokens: pass the UTF-8 byte length of the predicted tokens"
            )
        loss = total_nats / total_tokens
        return {
            "loss": loss,
            # exp overflows a float past ~709; a diverged model should read as inf, not crash the evaluation.
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": total_nats / math.log(2) / total_bytes,
            "num_tokens": total_tokens,
            "num_bytes": total_bytes,
        }
