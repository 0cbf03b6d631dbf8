"""The speculative-decoding benchmark (bench/speculative_bench.py) at a tiny size: structure, not numbers. Every
(draft, k) row must produce the target's own tokens."""

import json

from tiny_hf.cli import run_module


def test_every_draft_and_k_gives_the_targets_tokens(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--model", str(tiny_lm_dir), "--draft-layers", "1", "--k", "1,3", "--questions", "2"]
    argv += ["--new-tokens", "6", "--rounds", "1", "--out", str(tmp_path)]
    run_module("bench.speculative_bench", "tiny-hf bench speculative", argv)
    results = json.loads((tmp_path / "speculative_cpu.json").read_text())
    assert "machine" in results and results["questions"] == 2
    assert [(row["draft"], row["k"]) for row in results["rows"]] == [
        ("first 1 of 2 layers", 1),
        ("first 1 of 2 layers", 3),
    ]
    for row in results["rows"]:
        assert row["identical_to_target"] and 0 <= row["acceptance"] <= 1
        assert 1 <= row["tokens_per_target_forward"] <= row["k"] + 1 and row["speedup"]["median"] > 0
    assert "| first 1 of 2 layers | 3 |" in (tmp_path / "speculative_cpu.md").read_text()
