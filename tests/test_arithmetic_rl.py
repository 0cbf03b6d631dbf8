"""The arithmetic RL results, tiny: GRPO and our PPO train a few steps on the arithmetic task from the same start,
keep checkpoints, and bench/arithmetic_rl.py measures every method on the same held-out questions with Wilson
intervals, curves and the table (structure, not numbers)."""

import json

import pytest

from alignment import grpo, ppo
from bench import arithmetic_rl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rl_runs_on_arithmetic_become_one_table_with_intervals(tiny_lm_dir, tmp_path):
    task = "arithmetic:add,cmp"
    grpo.main(
        [
            *("--model", str(tiny_lm_dir), "--data", task, "--max-examples", "64", "--out", str(tmp_path / "grpo")),
            *("--num-generations", "4", "--per-device-train-batch-size", "8", "--max-completion-length", "8"),
            *("--max-steps", "2", "--logging-steps", "1", "--eval-examples", "4", "--rewards", "partial_credit"),
            *("--save-strategy", "steps", "--save-steps", "1"),
        ]
    )
    ppo.main(
        [
            *("--model", str(tiny_lm_dir), "--task", task, "--max-examples", "64", "--out", str(tmp_path / "ppo")),
            *("--reward-fn", "partial_credit", "--max-steps", "2", "--save-every", "1", "--keep-last", "2"),
            *("--batch-size", "8", "--minibatch-size", "4", "--max-new-tokens", "8", "--no-progress"),
        ]
    )
    results = tmp_path / "results"
    figures = arithmetic_rl.main(
        [
            *("--sft", str(tiny_lm_dir), "--task", task, "--run", f"GRPO={tmp_path / 'grpo'}"),
            *("--run", f"PPO={tmp_path / 'ppo'}", "--held-out", "12", "--curve-examples", "6", "--kl-examples", "4"),
            *("--results", str(results)),
        ]
    )
    assert list(figures["methods"]) == ["SFT", "GRPO", "PPO"] and figures["methods"]["SFT"]["kl"] == 0.0
    for result in figures["methods"].values():
        assert result["overall"]["n"] == 12 and set(result["by_kind"]) == {"add", "cmp"}
        assert result["overall"]["low"] <= result["overall"]["rate"] <= result["overall"]["high"]
    for name in ("GRPO", "PPO"):
        curve = figures["curves"][name]
        assert [p["step"] for p in curve["exact_match"]] == [0, 1, 2] and len(curve["reward"]) == 2
    table = (results / "arithmetic_rl.md").read_text()
    assert "| GRPO |" in table and ("within noise" in table or "beyond noise" in table)
    assert (results / "arithmetic_rl.png").stat().st_size > 0
    assert json.loads((results / "arithmetic_rl.json").read_text())["held_out"] == 12


def test_a_bad_run_or_task_fails_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="expected NAME=RUN"):
        arithmetic_rl.main(["--run", "runs/x", "--results", str(tmp_path)])
    with pytest.raises(ValueError, match="kind 'mul' is not one of"):
        arithmetic_rl.main(["--task", "arithmetic:mul", "--results", str(tmp_path)])
