"""Retrieval evaluation (rag/evaluate.py) and grounded answers (rag/answer.py); the metrics themselves (ranking
metrics, ROUGE-L) are tested against ranx and rouge-score in tests/test_metrics.py.

Kept fast: the indexes use the tiny test model as their encoder (no MiniLM), and a handful of documents.
"""

import json
import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag import Encoder, RagIndex
from rag.answer import (
    Answer,
    answer,
    build_prompt,
    cite,
    context_window,
    grounded_prompt,
    measure_answers,
    names_the_object,
)
from rag.evaluate import (
    QUERY_KINDS,
    build_queries,
    evaluate_index,
    hold_out_summaries,
    mean_metrics,
    paraphrase_query,
    rank_by_score,
    rewrite_query,
)
from tiny_hf.corpus import stdlib_documents, topic_documents
from tiny_hf.metrics import ranking_metrics


@pytest.fixture(scope="module")
def docs(small_stdlib):
    return stdlib_documents(str(small_stdlib)) + topic_documents()[:20]


@pytest.fixture(scope="module")
def tiny_index(tiny_lm_dir, docs):
    """An index whose encoder is the tiny random model: fast, and enough to run every code path."""
    index = RagIndex(Encoder(str(tiny_lm_dir)), chunk_size=64, overlap=8)
    index.add([{**d, "text": d["text"][:2500]} for d in docs[:12] + docs[-4:]])  # short: a few seconds to embed
    return index


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), AutoTokenizer.from_pretrained(tiny_lm_dir)


# ---- metrics ----
def test_ties_break_to_the_lower_index_and_change_the_metrics():
    scores = [0.5, 0.9, 0.9, 0.1]
    assert rank_by_score(scores, 3) == [1, 2, 0]
    assert ranking_metrics(rank_by_score(scores, 10), {1: 1})["ndcg@10"] == 1.0
    tied_second = ranking_metrics(rank_by_score(scores, 10), {2: 1})
    assert tied_second["mrr@10"] == 0.5 and tied_second["ndcg@10"] == pytest.approx(1 / math.log2(3))


@pytest.mark.filterwarnings("ignore:unsafe cast")  # numba, inside ranx
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 3), min_size=1, max_size=25),  # chunk scores: small integers, so many ties
            st.dictionaries(st.integers(0, 24), st.integers(1, 3), min_size=1, max_size=4),  # qrels (may be unscored)
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(10, 30),
)
def test_ranked_scores_average_to_ranx(cases, k):
    """rank_by_score + mean_metrics = ranx.evaluate on the raw scores, once our tie rule (lower index first) is
    written into them: score * n + (n - index) orders exactly as we do and is exact in float64 (ranx's own sort
    leaves ties to numba's unstable argsort)."""
    from ranx import evaluate

    queries = [SimpleNamespace(relevant=rel) for _, rel in cases]
    ours = mean_metrics([rank_by_score([float(s) for s in scores], k) for scores, _ in cases], queries)
    qrels = {f"q{i}": {str(d): g for d, g in rel.items()} for i, (_, rel) in enumerate(cases)}
    run = {
        f"q{i}": {str(d): float(s * len(scores) + len(scores) - d) for d, s in enumerate(scores)}
        for i, (scores, _) in enumerate(cases)
    }
    theirs = evaluate(qrels, run, list(ours), threads=1)
    assert ours == pytest.approx({m: float(v) for m, v in theirs.items()}, rel=1e-12, abs=1e-15)


def test_mean_metrics_checks_lengths():
    queries = [SimpleNamespace(relevant={1: 1}), SimpleNamespace(relevant={2: 1})]
    assert mean_metrics([[1], [1, 2]], queries)["mrr@10"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 queries"):
        mean_metrics([[1]], queries)


# ---- the query set ----
def test_rewrite_rules():
    s = "Serialize ``obj`` to a JSON formatted ``str``."
    assert (
        rewrite_query(s, source="docstring", qualname="json.dumps", variant=0)
        == "how do I convert obj to formatted text?"
    )
    assert (
        rewrite_query(s, source="docstring", qualname="json.dumps", variant=1)
        == "which function converts obj to formatted text?"
    )
    r = rewrite_query(
        "Return the root element of this tree.",
        source="docstring",
        qualname="xml.ElementTree.getroot",
        kind="method",
        variant=1,
    )
    assert r == "which method gives back root element of this tree?"
    assert rewrite_query("The if statement is used for conditional execution.", source="topic").startswith(
        "where is it explained that"
    )


def test_queries_are_deterministic_and_point_at_their_source(tiny_lm_dir, docs):
    from transformers import AutoTokenizer

    from rag import chunk_documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    chunks = chunk_documents(docs, tokenizer, chunk_size=64, overlap=8)
    queries = build_queries(chunks, n=40)
    assert queries == build_queries(chunks, n=40)
    assert 10 <= len(queries) <= 40 and len({q.qid for q in queries}) == len(queries)
    assert {q.source for q in queries} == {"docstring", "topic"}
    texts = {d["id"]: d["text"] for d in docs}
    for q in queries:
        ((i, grade),) = q.relevant.items()  # exactly one relevant chunk
        c = chunks[i]
        assert grade == 1 and c.doc_id == q.doc_id and c.start <= q.start < q.end <= c.end
        assert " ".join(texts[q.doc_id][q.start : q.end].split()) == q.sentence
        # no other chunk holds the whole sentence
        assert sum(o.doc_id == q.doc_id and o.start <= q.start and q.end <= o.end for o in chunks) == 1
        assert q.text.endswith("?") and q.text != q.sentence
    with pytest.raises(ValueError, match="n=0"):
        build_queries(chunks, n=0)


def test_paraphrase_rules():
    s = "Serialize ``obj`` to a JSON formatted ``str``."
    assert (
        paraphrase_query(s, qualname="json.dumps", args=["obj", "skipkeys"], variant=0)
        == "is there a way to convert the given value to formatted piece of text?"
    )
    # "JSON" goes with the name; without the name it gets its description
    assert "data interchange notation" in paraphrase_query(s, qualname="x.dumps", args=["obj"], variant=1)
    r = paraphrase_query("Fallback for getEvent using the SAX2 file interface.", qualname="a.B.c", kind="method")
    assert r == "what method fits this description: fallback for using document on disk interface?"
    assert paraphrase_query("Open the file.", qualname="a.b") == "is there a way to open document on disk?"


def _held_docs(docs):
    return [d for d in docs if d["id"].startswith("stdlib/")][:6] + docs[-3:]


def test_hold_out_removes_summaries_and_only_them(docs):
    picked = _held_docs(docs)
    out, held = hold_out_summaries(picked, fraction=1.0)
    assert held and len(out) == len(picked)
    texts = {d["id"]: d["text"] for d in out}
    for h in held:
        text = texts[h.doc_id]
        assert h.sentence not in " ".join(text.split())  # gone from the index's text
        assert text[h.start :].startswith(f"class {h.qualname}") or text[h.start :].startswith(f"{h.qualname}(")
        assert h.start < h.rest < h.end <= len(text) and len(text[h.rest : h.end].split()) >= 1
    # topics untouched; with fraction 0 nothing moves
    assert [d for d in out if d["id"].startswith("topic/")] == [d for d in picked if d["id"].startswith("topic/")]
    assert hold_out_summaries(picked, fraction=0.0) == (picked, [])
    half = hold_out_summaries(picked, fraction=0.5)[1]
    assert 0 < len(half) < len(held) and {(h.doc_id, h.qualname) for h in half} <= {
        (h.doc_id, h.qualname) for h in held
    }
    with pytest.raises(ValueError, match="fraction=1.5"):
        hold_out_summaries(picked, fraction=1.5)


def test_every_query_kind_points_at_its_chunk(tiny_lm_dir, docs):
    from transformers import AutoTokenizer

    from rag import chunk_documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    out, held = hold_out_summaries(_held_docs(docs), fraction=1.0)
    chunks = chunk_documents(out, tokenizer, chunk_size=64, overlap=8)
    queries = build_queries(chunks, n=30, per_doc=3, kinds=QUERY_KINDS, held_out=held)
    assert queries == build_queries(chunks, n=30, per_doc=3, kinds=QUERY_KINDS, held_out=held)
    assert {q.source for q in queries} == set(QUERY_KINDS) and len({q.qid for q in queries}) == len(queries)
    for q in queries:
        ((i, grade),) = q.relevant.items()
        c = chunks[i]
        assert grade == 1 and c.doc_id == q.doc_id and c.start <= q.start < q.end <= c.end
        assert q.text.endswith("?")
        if q.source == "held_out":
            assert all(q.sentence not in " ".join(o.text.split()) for o in chunks)  # nowhere to copy it from
            assert c.text.lstrip().startswith(q.answer) or f"{q.answer}(" in c.text or f"class {q.answer}" in c.text
        if q.source in ("paraphrase", "held_out"):
            assert q.answer.count(".") >= 1 and q.answer.rsplit(".", 1)[-1] not in q.text.split()
    # the original kinds are unchanged by the new ones: the same draw as asking for them alone
    original = [q for q in queries if q.source in ("docstring", "topic")]
    assert original == build_queries(chunks, n=30, per_doc=3, held_out=held)


def test_query_kind_errors(tiny_index):
    with pytest.raises(
        ValueError, match=r"\['bogus'\] are not among \['docstring', 'topic', 'paraphrase', 'held_out'\]"
    ):
        build_queries(tiny_index.chunks, kinds=["docstring", "bogus"])
    with pytest.raises(ValueError, match="held_out=hold_out_summaries"):
        build_queries(tiny_index.chunks, kinds=["held_out"])
    with pytest.raises(ValueError, match="no query kind"):
        build_queries(tiny_index.chunks, kinds=[])


def test_names_the_object():
    assert names_the_object("Use `json.dumps(obj)`.", "json.dumps")
    assert names_the_object("call dumps", "json.dumps") and not names_the_object("it undumps", "json.dumps")
    assert not names_the_object("Dumps it", "json.dumps")  # case as written
    assert names_the_object("anything", "A whole sentence, not a name.") is None


def test_evaluation_runs_on_a_tiny_index(tiny_index):
    queries = build_queries(tiny_index.chunks, n=15)
    assert queries
    results = evaluate_index(tiny_index, queries, retrievers=("bm25", "dense", "hybrid", "bm25s"))
    for m in results.values():
        assert all(0 <= m[name] <= 1 for name in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"))
        assert m["recall@1"] <= m["recall@5"] <= m["recall@10"]
    per = evaluate_index(tiny_index, queries, retrievers=("bm25",), per_query=True)["bm25"]
    assert len(per["per_query"]) == len(queries)
    assert per["recall@1"] == pytest.approx(sum(m["recall@1"] for m in per["per_query"]) / len(queries))
    # same method, parameters and tokens: bm25s and ours find the same chunks
    assert results["bm25s"]["recall@10"] == results["bm25"]["recall@10"]
    with pytest.raises(ValueError, match="not among"):
        evaluate_index(tiny_index, queries, retrievers=("faiss",))


def test_evaluation_errors(tiny_lm_dir, tiny_index):
    empty = RagIndex(tiny_index.encoder, chunk_size=64, overlap=8)
    with pytest.raises(ValueError, match="index is empty"):
        evaluate_index(empty, [SimpleNamespace(text="x", relevant={0: 1})])
    with pytest.raises(ValueError, match="k=5"):
        evaluate_index(tiny_index, build_queries(tiny_index.chunks, n=2), k=5)


# ---- grounded answers ----
def _hits(n: int):
    return [SimpleNamespace(doc_id=f"doc{i}", text=f"passage number {i} " * 6) for i in range(1, n + 1)]


def test_prompt_drops_the_lowest_ranked_passages_and_keeps_the_question(tiny_lm):
    _, tokenizer = tiny_lm
    question = "What does passage three say?"
    hits = _hits(4)
    full, n_full = build_prompt(question, hits, tokenizer, budget=10_000)
    assert n_full == 4
    two, _ = build_prompt(question, hits[:2], tokenizer, budget=10_000)
    ids, n = build_prompt(question, hits, tokenizer, budget=len(two))
    assert n == 2 and ids == two and len(ids) <= len(two) < len(full)
    text = tokenizer.decode(ids)
    assert question in text and "[1] (doc1)" in text and "[2] (doc2)" in text and "[3]" not in text
    bare, n0 = build_prompt(
        question, hits, tokenizer, budget=len(build_prompt(question, [], tokenizer, budget=9999)[0])
    )
    assert n0 == 0 and question in tokenizer.decode(bare)
    with pytest.raises(ValueError, match="without any passage"):
        build_prompt("why " * 500, hits, tokenizer, budget=200)
    with pytest.raises(ValueError, match="empty"):
        build_prompt("  ", hits, tokenizer, budget=200)


def test_answer_returns_text_and_sources(tiny_index, tiny_lm, docs):
    model, tokenizer = tiny_lm
    result = answer(
        "How do I read rows from a CSV file?",
        tiny_index,
        model,
        tokenizer,
        k=3,
        mode="bm25",
        max_new_tokens=12,
        system=None,
    )
    assert isinstance(result, Answer) and isinstance(result.text, str)
    assert 1 <= len(result.sources) <= 3 and result.dropped == 3 - len(result.sources)
    assert result.prompt_tokens <= 256 - 12
    texts = {d["id"]: d["text"] for d in docs}
    for s in result.sources:
        assert texts[s.doc_id][s.start : s.end] == s.text
    assert all(c in result.sources for c in result.citations)


def test_citations_are_parsed_from_the_answer(tiny_index, tiny_lm):
    model, tokenizer = tiny_lm
    ids, sources, dropped = grounded_prompt(
        "csv reader rows", tiny_index, tokenizer, window=context_window(model), k=2, mode="bm25", system=None
    )
    result = cite("See [2], then [1] and [2]; not [9].", sources, prompt_tokens=len(ids), dropped=dropped)
    assert [c.number for c in result.citations] == [2, 1]
    assert [s.number for s in result.sources] == [1, 2]


def test_answer_errors(tiny_index, tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="k=0"):
        answer("a question", tiny_index, model, tokenizer, k=0)
    empty = RagIndex(tiny_index.encoder, chunk_size=64, overlap=8)
    with pytest.raises(ValueError, match="index is empty"):
        answer("a question", empty, model, tokenizer)
    with pytest.raises(ValueError, match="without any passage"):
        answer("why " * 400, tiny_index, model, tokenizer, mode="bm25")
    with pytest.raises(ValueError, match="no room"):
        answer("a question", tiny_index, model, tokenizer, max_new_tokens=256)


def test_measure_answers_with_and_without_retrieval(tiny_index, tiny_lm):
    model, tokenizer = tiny_lm
    queries = build_queries(tiny_index.chunks, n=2)
    result = measure_answers(queries, tiny_index, model, tokenizer, k=2, mode="bm25", max_new_tokens=6)
    assert result["questions"] == 2 and 0 <= result["retrieved_relevant"] <= 1
    for side in ("with_retrieval", "without_retrieval"):
        assert 0 <= result[side]["rougeL_f1"] <= 1 and 0 <= result[side]["exact_match"] <= 1
    rows = result["per_question"]
    assert [r["question"] for r in rows] == [q.text for q in queries]
    for r in rows:
        assert 0 <= r["rougeL_f1_with"] <= 1 and r["names_with"] in (True, False, None)
    mean_with = sum(r["rougeL_f1_with"] for r in rows) / len(rows)
    assert mean_with == pytest.approx(result["with_retrieval"]["rougeL_f1"])


def test_answer_evaluate_and_search_clis(tiny_index, tiny_lm_dir, tmp_path, capsys):
    """rag.answer, rag.evaluate and rag.search as commands on a saved tiny index: a cited answer, the with/without
    measurement, the retrieval table, options from a --config file, and one-line errors for a bad --model/--index."""
    from rag import answer as answer_cli
    from rag import evaluate as evaluate_cli
    from rag import search as search_cli

    index_dir = str(tiny_index.save(tmp_path / "ix"))
    common = ["--index", index_dir, "--model", str(tiny_lm_dir), "--mode", "bm25", "-k", "2", "--max-new-tokens", "6"]
    result = answer_cli.main([*common, "How do I read rows from a CSV file?", "--json"])
    assert len(result["sources"]) + result["dropped"] == 2 and result["prompt_tokens"] <= 256 - 6
    assert json.loads(capsys.readouterr().out)["text"] == result["text"]
    measured = answer_cli.main([*common, "--measure", "2"])
    assert measured["questions"] == 2 and set(measured) >= {"with_retrieval", "without_retrieval"}
    with pytest.raises(SystemExit, match="cannot load --model"):
        answer_cli.main(["--index", index_dir, "--model", str(tmp_path), "a question"])
    with pytest.raises(SystemExit, match="cannot load --index"):
        answer_cli.main(["--index", str(tmp_path / "none"), "--model", str(tiny_lm_dir), "a question"])
    with pytest.raises(SystemExit, match="give a question"):
        answer_cli.main(["--index", index_dir, "--model", str(tiny_lm_dir)])

    summary = evaluate_cli.main(["--index", index_dir, "--retrievers", "bm25", "bm25s", "--queries", "10", "--json"])
    assert set(summary["results"]) == {"bm25", "bm25s"} and 0 < summary["queries"] <= 10

    config = tmp_path / "search.yaml"
    config.write_text("mode: bm25\ntop_k: 1\n")
    hits = search_cli.main(["--index", index_dir, "csv reader rows", "--config", str(config)])
    assert len(hits) == 1
    doc = hits[0]["doc_id"]
    source = tiny_index.chunks[hits[0]["chunk_index"]].metadata["source"]
    filtered = ["--where", f"id={doc}", "--where", f"source={source}", "--mode", "bm25", "-k", "3"]
    hits = search_cli.main(["--index", index_dir, "csv reader rows", *filtered])
    assert hits and {h["doc_id"] for h in hits} == {doc}  # both filters hold (repeated --where adds up)
