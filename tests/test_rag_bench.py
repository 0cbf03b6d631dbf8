"""bench/rag_bench.py on a tiny budget: the structure of its results (per-kind tables with intervals, the grounded
answers with and without retrieval), not their numbers. MiniLM embeds two dozen chunks; the generator is the tiny
test model, so no SmolLM2."""

import json

import pytest

from tiny_hf.cli import run_module

TINY = ["--max-docs", "8", "--queries", "6", "--repeats", "1", "--sizes", "200", "--scale-queries", "3"]


@pytest.mark.slow
def test_tiny_bench_reports_every_kind_with_intervals_and_answers(tmp_path, tiny_lm_dir):
    missing = tmp_path / "no-such-model"
    argv = [*TINY, "--answers", "2", "--max-new-tokens", "4", "--top-k", "1", "--hold-out", "1.0"]
    figures = run_module(
        "bench.rag_bench",
        "tiny-hf bench rag",
        [*argv, "--model", str(tiny_lm_dir), str(missing), "--results", str(tmp_path)],
    )
    quality = figures["quality"]
    # the report card reads these plain means
    assert set(quality["retrievers"]) == {"bm25", "dense", "hybrid", "bm25s", "st"}
    assert all(isinstance(m["recall@1"], float) for m in quality["retrievers"].values())
    assert list(quality["by_kind"])[0] == "all" and {"paraphrase", "held_out"} <= set(quality["by_kind"])
    for kind, table in quality["by_kind"].items():
        assert table["queries"] == (quality["queries"] if kind == "all" else quality["query_sources"][kind])
        assert set(table["retrievers"]) == {"bm25", "dense", "hybrid"}
        for figures_ in table["retrievers"].values():
            assert {"rate", "low", "high"} <= set(figures_["recall@1"]) and {"mean", "low", "high"} <= set(
                figures_["ndcg@10"]
            )
            assert all(f["low"] <= f.get("rate", f.get("mean")) <= f["high"] for f in figures_.values())
    answers = figures["answers"]
    assert answers["questions"] == 2 and answers["kinds"]["paraphrase"] + answers["kinds"]["held_out"] == 2
    assert answers["models"][str(missing)] == {"skipped": f"{missing} does not exist"}
    measured = answers["models"][str(tiny_lm_dir)]
    for side in ("with", "without"):
        assert {"rate", "low", "high"} <= set(measured[side]["names_the_object"])
        assert {"mean", "low", "high"} <= set(measured[side]["rougeL_f1"])
    assert set(measured["beyond_noise"]) == {"names_the_object", "rougeL_f1"}
    md = (tmp_path / "rag.md").read_text()
    assert "### paraphrase:" in md and "### held_out:" in md and "Beyond noise:" in md
    answers_md = (tmp_path / "rag_answers.md").read_text()
    assert "| with retrieval |" in answers_md and f"Not measured: {missing}" in answers_md
    assert json.loads((tmp_path / "rag_answers.json").read_text())["questions"] == 2


def test_unknown_kind_is_a_clear_error():
    from bench.rag_bench import parse_args

    with pytest.raises(ValueError, match=r"--kinds \['bogus'\] are not among \['docstring', 'topic', 'paraphrase'"):
        parse_args(["--kinds", "paraphrase", "bogus"])
