"""Every metric the stages report, in one place.

- `load_lm_metric`: loss, perplexity and bits per byte from summed rows (the local `evaluate` module lm_metrics.py).
- `load_rouge_l`: ROUGE-L F1/precision/recall of generated against reference text (the local module rouge_l.py).
- `ranking_metrics`: recall@k, MRR@10 and nDCG@10 of one ranking, as ranx (and BEIR / pytrec_eval) define them.

The two `evaluate` modules are loaded by absolute path, so they work offline (Hub metrics do not) and from any
directory; `keep_in_memory` defaults to True, since the rows are a few numbers and need no Arrow cache or file locks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

LM_METRICS_PATH = Path(__file__).resolve().parent / "lm_metrics.py"
ROUGE_L_PATH = Path(__file__).resolve().parent / "rouge_l.py"
DEFAULT_KS = (1, 5, 10)


def _load(path: Path, **kwargs) -> evaluate.EvaluationModule:
    import evaluate  # here, not at the top: importing tiny_hf.metrics should not pull in evaluate and datasets

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(path), **kwargs)


def load_lm_metric(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of lm_metrics.py; feed it with `add_batch(losses=..., num_tokens=..., num_bytes=...)`.

    Args:
        **kwargs: Passed to `evaluate.load`.
    """
    return _load(LM_METRICS_PATH, **kwargs)


def load_rouge_l(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of rouge_l.py; `compute(predictions=[...], references=[...])`.

    Args:
        **kwargs: Passed to `evaluate.load`.
    """
    return _load(ROUGE_L_PATH, **kwargs)


def ranking_metrics(ranked: Sequence[int], relevant: dict[int, int], *, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """recall@k for each k, MRR@10 and nDCG@10 of one ranking: ranx's `recall@k`, `mrr@10` and `ndcg@10`.

    nDCG is Järvelin & Kekäläinen's (2002), as in pytrec_eval and BEIR: linear gain (the grade) over a log2(rank + 1)
    discount, not ranx's `ndcg_burges` (gain 2^grade - 1). Relevant means grade >= 1 (ranx's rel_lvl=1). A run in
    ranx or trec_eval holds an id once, so a repeated id counts at its first place only; ties in score must be broken
    before (rag.evaluate.rank_by_score). tests/test_metrics.py checks all this on random rankings (to 1e-12).

    Args:
        ranked: retrieved ids, best first (ties already broken).
        relevant: id -> relevance grade (> 0 relevant); must not be empty.
        ks: the cut-offs of recall.
    """
    rel = {d: g for d, g in relevant.items() if g > 0}
    if not rel:
        raise ValueError("a query needs at least one relevant id (grade > 0)")
    ranked = list(dict.fromkeys(ranked))  # a retriever that repeats an id gets credit once
    out = {f"recall@{k}": sum(1 for d in ranked[:k] if d in rel) / len(rel) for k in ks}
    first = next((r for r, d in enumerate(ranked[:10], start=1) if d in rel), None)
    out["mrr@10"] = 1.0 / first if first else 0.0
    dcg = sum(rel.get(d, 0) / math.log2(r + 1) for r, d in enumerate(ranked[:10], start=1))
    ideal = sum(g / math.log2(r + 1) for r, g in enumerate(sorted(rel.values(), reverse=True)[:10], start=1))
    out["ndcg@10"] = dcg / ideal
    return out
