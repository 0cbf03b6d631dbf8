"""The engine-vs-llama.cpp benchmark (bench/engine_vs_llamacpp.py) at a tiny size: structure, not numbers. Our own
model and a stock Llama (which the engine runs through `tiny_hf.from_llama` where it exists, and skips with a note
where it does not) land as two sections of one results file."""

import json

import pytest

import tiny_hf
from tiny_hf.cli import run_module

TINY = ["--rounds", "1", "--prompt-len", "8", "--new-tokens", "4", "--concurrent", "3", "--lengths", "fixed"]
TINY += ["--max-seq-len", "64", "--no-compile", "--profile", "--profile-steps", "2"]


def test_both_models_write_one_results_file_with_every_figure(tiny_lm_dir, stock_llama_dir, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for label, folder in (("ours", tiny_lm_dir), ("llama", stock_llama_dir)):
        argv = ["--model", str(folder), "--label", label, "--gguf-dir", str(tmp_path / "gguf"), "--out", str(tmp_path)]
        run_module("bench.engine_vs_llamacpp", "tiny-hf bench engine-vs-llamacpp", [*argv, *TINY])
    assert {p.name for p in (tmp_path / "gguf").iterdir()} == {"ours.f32.gguf", "llama.f32.gguf"}

    results = json.loads((tmp_path / "engine_vs_llamacpp_cpu.json").read_text())
    assert "machine" in results and list(results["models"]) == ["ours", "llama"]
    ours, llama = results["models"]["ours"], results["models"]["llama"]
    assert list(ours["batch1"]) == ["engine", "generate", "llama_cpp_f32"]
    for figures in ours["batch1"].values():
        assert figures["ttft_ms"]["n"] == 1 and figures["decode_tokens_per_s"]["median"] > 0
    assert ours["batch1"]["engine"]["decode_vs_llama_cpp"]["median"] > 0
    assert ours["greedy_agreement"]["engine"] == {"same": 4, "of": 4, "first_difference": None}
    assert set(ours["concurrent"]) == {"requests", "lengths", "engine", "llama_cpp_f32"}
    assert ours["concurrent"]["engine"]["vs_llama_cpp"]["median"] > 0
    assert set(ours["goals"]) == {"batch1_decode", "concurrent"} and ours["goal_batch1"] == 0.7
    assert set(ours["profile"]["share"]) >= {"matmul", "attention", "sampling", "python and framework overhead"}
    assert sum(ours["profile"]["share"].values()) == pytest.approx(1.0, abs=0.01)

    assert llama["goal_batch1"] == 1.0
    if hasattr(tiny_hf, "from_llama"):
        assert "engine" in llama["batch1"] and "profile" in llama
    else:
        assert list(llama["batch1"]) == ["generate", "llama_cpp_f32"] and "engine skipped" in llama["notes"][0]
    table = (tmp_path / "engine_vs_llamacpp_cpu.md").read_text()
    assert "### ours" in table and "### llama" in table and "| llama_cpp_f32 |" in table and "Machine:" in table
