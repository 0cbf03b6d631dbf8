"""ROUGE-L and exact match as a local `evaluate` module (loads offline; the Hub's "rouge" needs the network and the
rouge_score package).

Load it with `evaluate.load("tiny_hf/metrics/rouge_l.py")` or `tiny_hf.metrics.load_rouge_l()`. `evaluate` copies
this file into its modules cache and imports it from there, so it stands alone: no imports from rag or tiny_hf.
"""

import re
import string

import datasets
import evaluate

_DESCRIPTION = """\
ROUGE-L (Lin 2004): the longest common subsequence (LCS) of the prediction's and the reference's tokens. With m
reference tokens and n predicted ones, recall = LCS / m, precision = LCS / n, F1 = 2PR / (P + R); 0 when either side
has no tokens. Per pair this is exactly rouge_score's `RougeScorer(["rougeL"], use_stemmer=False).score(reference,
prediction)` (its defaults, also those of the Hub's "rouge" metric): its tokenizer (lowercase, every run of characters
other than a-z and 0-9 separates), no stemming; rougeL, not rougeLsum (which first splits on newlines).
tests/test_metrics.py checks it on random text. Scores are the plain mean over the pairs (the Hub metric with
use_aggregator=False, averaged; its default is a bootstrap estimate of that mean).

Exact match (SQuAD, Rajpurkar et al. 2016): 1 if the two texts are equal after lowercasing, removing punctuation and
the articles a/an/the, and collapsing whitespace.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: the generated texts.
    references: one reference text per prediction.
Returns:
    rougeL_precision, rougeL_recall, rougeL_f1: means over the pairs.
    exact_match: share of pairs equal after normalisation.
Example:
    >>> metric = evaluate.load("tiny_hf/metrics/rouge_l.py")
    >>> metric.compute(predictions=["the cat sat"], references=["the cat sat down"])["rougeL_recall"]
    0.75
"""

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's `tokenize.tokenize(text, stemmer=None)`: lowercase, then runs of [a-z0-9]."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row: O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, f1) of one pair: rouge_score's `score(reference, prediction)["rougeL"]`."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    lcs = lcs_length(pred, ref)
    p, r = lcs / len(pred), lcs / len(ref)
    return p, r, (2 * p * r / (p + r) if lcs else 0.0)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


class RougeL(evaluate.Metric):
    """ROUGE-L precision / recall / F1 and exact match over (prediction, reference) pairs."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def compute(self, **kwargs) -> dict | None:
        """`evaluate.Metric.compute`, with a clear error where evaluate would fail on an empty buffer."""
        if self.writer is None and kwargs.get("predictions") is None and kwargs.get("references") is None:
            raise ValueError("nothing to compute: add pairs with add() or add_batch() first (compute() empties them)")
        return super().compute(**kwargs)

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        if not predictions:
            raise ValueError("no (prediction, reference) pairs: ROUGE-L of nothing is undefined")
        scores = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
        n = len(scores)
        return {
            "rougeL_precision": sum(s[0] for s in scores) / n,
            "rougeL_recall": sum(s[1] for s in scores) / n,
            "rougeL_f1": sum(s[2] for s in scores) / n,
            "exact_match": sum(
                normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
            )
            / n,
        }
