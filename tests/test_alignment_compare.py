"""Tests for alignment/compare.py: every method measured on the same held-out prompts, KL to SFT is 0 for the SFT
model itself and positive for a changed policy, best-of-n keeps the reward model's favourite, checkpoints of a PPO
run become the over-optimisation plot, and bad arguments fail before anything loads."""

import functools
import json
import math
import shutil

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import compare, data
from tiny_hf import TinyForSequenceClassification

PAD = 2  # <|pad|> of tiny_hf tokenizers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small_tasks(small_stdlib, monkeypatch):
    """The held-out sets built from a few standard-library modules (the full library takes a while to parse)."""
    monkeypatch.setattr(
        compare,
        "preference_dataset",
        functools.partial(data.preference_dataset, stdlib_dir=str(small_stdlib), val_fraction=0.3),
    )
    monkeypatch.setattr(
        compare, "verifiable_dataset", functools.partial(data.verifiable_dataset, stdlib_dir=str(small_stdlib))
    )


@pytest.fixture
def runs(tiny_lm_dir, tmp_path):
    """A reward model on the policy's tokenizer, a changed policy, and a fake PPO run with two checkpoints."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    reward = TinyForSequenceClassification(
        tiny_config(vocab_size=len(tokenizer), max_position_embeddings=256, num_labels=1, pad_token_id=PAD)
    )
    reward.save_pretrained(tmp_path / "reward" / "model")
    tokenizer.save_pretrained(tmp_path / "reward" / "model")
    policy = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        policy.lm_head.weight.add_(torch.randn_like(policy.lm_head.weight))
    policy.save_pretrained(tmp_path / "changed" / "model")
    tokenizer.save_pretrained(tmp_path / "changed" / "model")
    (tmp_path / "changed" / "summary.json").write_text(json.dumps({"minutes": 1.5, "tied_group_share": 0.25}))
    for step, source in ((1, tiny_lm_dir), (2, tmp_path / "changed" / "model")):
        shutil.copytree(source, tmp_path / "ppo" / "checkpoints" / f"step-{step:07d}")
    return tmp_path


def args_for(tiny_lm_dir, runs, *extra):
    return [
        "--sft",
        str(tiny_lm_dir),
        "--reward-model",
        str(runs / "reward"),
        "--docs-examples",
        "6",
        "--verifiable-examples",
        "6",
        "--kl-examples",
        "4",
        "--max-new-tokens",
        "6",
        "--best-of-n",
        "3",
        "--out",
        str(runs / "out"),
        *extra,
    ]


@pytest.mark.slow
def test_one_table_for_every_method_on_the_same_prompts(tiny_lm_dir, runs, small_tasks):
    figures = compare.main(
        args_for(
            tiny_lm_dir,
            runs,
            "--policy",
            f"docs:Changed={runs / 'changed'}",
            "--policy",
            f"verifiable:Same={tiny_lm_dir}",
            "--trajectory",
            f"PPO={runs / 'ppo'}",
        )
    )
    rows = {row["name"]: row for row in figures["rows"]}
    assert list(rows) == ["SFT", "best-of-3", "Changed", "Same"]
    # the start against itself: log-ratios are exactly 0, and the same weights give the same answers and scores
    assert rows["SFT"]["kl_docs"] == 0 and rows["SFT"]["kl_verifiable"] == 0
    assert rows["Same"]["kl_docs"] == 0 and rows["Same"]["docs"] == rows["SFT"]["docs"]
    # a changed policy drifts: KL(pi || SFT) > 0 (a sum of log-ratios of its own samples)
    assert rows["Changed"]["kl_docs"] > 0.01 and rows["Changed"]["kl_verifiable"] > 0.01
    assert rows["Changed"]["minutes"] == 1.5 and figures["tied_groups"] == {"Changed": 0.25}
    assert rows["best-of-3"]["kl_docs"] == pytest.approx(math.log(3) - 2 / 3)
    for row in rows.values():
        assert 0 <= row["docs"]["rouge_l"] <= 1 and row["docs"]["length"] >= 0
    assert 0 <= rows["SFT"]["verifiable"]["exact_match"] <= 1
    # the trajectory: one point per checkpoint; step 1 is the SFT weights (KL 0), step 2 the changed policy
    points = figures["trajectories"]["PPO"]
    assert [p["step"] for p in points] == [1, 2]
    assert points[0]["kl"] == 0 and points[0]["reward"] == pytest.approx(rows["SFT"]["docs"]["reward"])
    assert points[1]["kl"] == pytest.approx(rows["Changed"]["kl_docs"])
    table = (runs / "out" / "alignment.md").read_text()
    assert "| Changed | docs |" in table and "alignment_overoptimization.png" in table
    assert (runs / "out" / compare.PLOT_FILE).stat().st_size > 10_000
    assert json.loads((runs / "out" / "alignment.json").read_text())["rows"][0]["name"] == "SFT"


def test_best_of_n_keeps_the_reward_models_favourite(tiny_lm_dir, runs, small_tasks, monkeypatch):
    """With a judge that prefers longer answers, best-of-n answers are at least as long as any single sample."""
    args = compare.parse_args(args_for(tiny_lm_dir, runs))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    judge = compare.Judge(str(runs / "reward"), 256)
    monkeypatch.setattr(judge, "scores", lambda rows, answers: [float(len(a)) for a in answers])
    rows = list(compare.preference_dataset()["validation"])[:4]
    samples = [r.text for r in compare.sample(model, tokenizer, rows, max_new_tokens=6, seed=0, n=3)]
    best = compare.best_of_n(model, tokenizer, judge, rows, args)
    for i, answer in enumerate(best["docs_answers"]):
        assert len(answer) == max(len(s) for s in samples[3 * i : 3 * i + 3])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--policy", "DPO=runs/dpo"], "TASK:NAME=RUN"),
        (["--policy", "chat:DPO=runs/dpo"], "TASK:NAME=RUN"),
        (["--policy", "docs:SFT=runs/x"], "unique and not 'SFT'"),
        (["--policy", "docs:DPO=/no/such/run"], "no such run"),
        (["--trajectory", "PPO"], "NAME=RUN"),
        (["--best-of-n", "1"], "best-of-n"),
        (["--kl-examples", "0"], "kl-examples"),
    ],
)
def test_bad_arguments_fail_before_loading(tiny_lm_dir, runs, extra, match):
    with pytest.raises(ValueError, match=match):
        compare.main(args_for(tiny_lm_dir, runs, *extra))


def test_a_trajectory_needs_checkpoints(tiny_lm_dir, runs):
    with pytest.raises(ValueError, match="no checkpoints"):
        compare.main(args_for(tiny_lm_dir, runs, "--trajectory", f"PPO={runs / 'changed'}"))
