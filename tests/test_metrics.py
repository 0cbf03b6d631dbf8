"""tiny_hf.metrics. The local `evaluate` module for loss, perplexity and bits per byte loads offline from any
directory, matches hand-computed values and torch's cross-entropy, combines batches exactly, and refuses empty
input with a clear error. ROUGE-L equals rouge-score and the ranking metrics equal ranx, on hand-worked and on
random cases (ties, duplicates, empty predictions, cut-offs past the end of the list)."""

import math
from pathlib import Path

import evaluate
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tiny_hf.metrics import LM_METRICS_PATH, load_lm_metric, load_rouge_l, ranking_metrics
from tiny_hf.metrics.rouge_l import rouge_l, rouge_tokens

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


# ---- ROUGE-L ----
def test_rouge_l_hand_worked():
    metric = load_rouge_l()
    out = metric.compute(predictions=["the cat sat", "A B C D"], references=["the cat sat down", "b d x"])
    # pair 1: LCS 3, P = 3/3, R = 3/4; pair 2: LCS 2 (b, d), P = 2/4, R = 2/3
    assert out["rougeL_precision"] == pytest.approx((1 + 0.5) / 2)
    assert out["rougeL_recall"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert out["rougeL_f1"] == pytest.approx((6 / 7 + 4 / 7) / 2)
    assert out["exact_match"] == 0
    same = metric.compute(predictions=["The Cat!", ""], references=["cat", "anything"])
    # "the cat" vs "cat": P = 1/2, R = 1, F1 = 2/3; an empty prediction scores 0
    assert same["exact_match"] == 0.5 and same["rougeL_f1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="nothing to compute"):
        metric.compute()


# Words that collide once lowercased or split ("Cat" / "cat!", "x-1" / "x 1"), digits, non-ASCII letters (dropped
# as separators), so random texts share tokens; any text at all is drawn too.
WORDS = ["the", "The", "CAT", "cat!", "sat", "a", "x-1", "x", "1", "42", "don't", "naïve", "é", "ß", "İ", "_", "..."]
SEPARATORS = [" ", "  ", "\n", "\t", ", ", "-", "/"]
texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=15).map(
        lambda pairs: "".join(w + sep for w, sep in pairs)
    ),
)


@settings(max_examples=300, deadline=None)
@given(texts, texts)
def test_rouge_l_equals_rouge_score(prediction, reference):
    from rouge_score import rouge_scorer, tokenize

    assert rouge_tokens(prediction) == tokenize.tokenize(prediction, None)
    theirs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"]
    assert rouge_l(prediction, reference) == (theirs.precision, theirs.recall, theirs.fmeasure)  # exactly


@pytest.fixture(scope="module")
def rouge_metric():
    return load_rouge_l()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=1, max_size=6))
def test_rouge_l_module_is_the_mean_of_rouge_score(rouge_metric, pairs):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"] for p, r in pairs]
    out = rouge_metric.compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs])
    for name, field in [("precision", "precision"), ("recall", "recall"), ("f1", "fmeasure")]:
        assert out[f"rougeL_{name}"] == pytest.approx(sum(getattr(s, field) for s in scores) / len(scores))


# ---- ranking metrics ----
def test_metrics_hand_worked():
    m = ranking_metrics([3, 1, 2], {1: 1, 2: 1})
    assert m["recall@1"] == 0 and m["recall@5"] == 1 and m["recall@10"] == 1
    assert m["mrr@10"] == 0.5
    # DCG = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))
    graded = ranking_metrics([7, 5], {5: 2, 7: 1})  # linear gain: the grade itself
    assert graded["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    miss = ranking_metrics([9] * 3 + list(range(10, 30)), {1: 1})
    assert miss == {"recall@1": 0, "recall@5": 0, "recall@10": 0, "mrr@10": 0, "ndcg@10": 0}
    late = ranking_metrics(list(range(10, 20)) + [1], {1: 1})  # rank 11: outside every cut-off
    assert late["mrr@10"] == 0 and late["ndcg@10"] == 0
    with pytest.raises(ValueError, match="relevant"):
        ranking_metrics([1], {1: 0})


def ranx_per_query(ranked: list[int], relevant: dict[int, int], metrics: list[str]) -> dict[str, float]:
    """ranx.evaluate of one ranking, given as strictly falling scores. A ranx run maps each id to one score, so a
    repeated id keeps its first (best) place, as ours does. ranx's dict input rejects an empty ranking (its Run
    class with make_comparable=True scores one 0 everywhere, as trec_eval -c does, but costs seconds of numba
    compilation), so an empty ranking is checked against 0 directly."""
    from ranx import evaluate

    if not ranked:
        return dict.fromkeys(metrics, 0.0)
    unique = list(dict.fromkeys(ranked))
    run = {"q": {str(d): float(len(unique) - r) for r, d in enumerate(unique)}}
    qrels = {"q": {str(d): g for d, g in relevant.items()}}
    return {m: float(v[0]) for m, v in evaluate(qrels, run, metrics, return_mean=False, threads=1).items()}


@pytest.mark.filterwarnings("ignore:unsafe cast")  # numba, inside ranx
@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 14), max_size=20),  # a small id space: hits, misses and repeated ids are all common
    st.dictionaries(st.integers(0, 14), st.integers(0, 3), min_size=1, max_size=6),  # grade 0: judged, not relevant
    st.lists(st.integers(1, 25), min_size=1, max_size=4, unique=True),  # cut-offs, often past the list's end
)
def test_ranking_metrics_equal_ranx(ranked, relevant, ks):
    assume(any(g > 0 for g in relevant.values()))
    ours = ranking_metrics(ranked, relevant, ks=ks)
    theirs = ranx_per_query(ranked, relevant, list(ours))
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
