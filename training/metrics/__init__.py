"""Local `evaluate` metrics (they load offline, unlike Hub metrics) and a loader that works from any directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

LM_METRICS_PATH = Path(__file__).resolve().parent / "lm_metrics.py"


def load_lm_metric(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of lm_metrics.py by absolute path: loss, perplexity and bits per byte from summed rows.

    Args:
        **kwargs: Passed to `evaluate.load`. `keep_in_memory` defaults to True: the rows are a few numbers, so
            there is no reason for evaluate's on-disk Arrow cache and its file locks.

    Returns:
        An `evaluate.EvaluationModule`; feed it with `add` / `add_batch(losses=..., num_tokens=..., num_bytes=...)`.
    """
    import evaluate  # here, not at the top: importing training.metrics should not pull in evaluate and datasets

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(LM_METRICS_PATH), **kwargs)
