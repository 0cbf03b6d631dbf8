"""DPO with TRL: full fine-tune (a frozen copy as the reference) and LoRA (adapters off as the reference) train,
summarise the implicit rewards and export a model that AutoModelForCausalLM loads; a short run learns an easy
preference; bad flags and bad rows fail before training; a stock Llama trains too."""

import json

import pytest
from conftest import check_stage_record, tensorboard_scalars, trackio_logs
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import dpo

TOPICS = ["lists", "files", "sockets", "threads", "dates", "paths", "json", "regexes", "queues", "sets"]


def write_preferences(path, n: int = 60) -> None:
    """Pairs a tiny model tells apart quickly: a varied sentence (chosen) against a stutter (rejected)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is module {i} about?"}],
                "chosen": [{"role": "assistant", "content": f"It works with {topic}."}],
                "rejected": [{"role": "assistant", "content": " ".join(["the the"] * (2 + i % 3))}],
                "kind": "repetitive",
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows))


@pytest.fixture
def prefs(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_preferences(path)
    return path


def run(model_dir, data, out, *extra):
    return dpo.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--per-device-train-batch-size",
            "4",
            "--max-length",
            "64",
            "--warmup-steps",
            "0",
            "--logging-steps",
            "1",
            *extra,
        ]
    )


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_trains_summarises_and_exports(tiny_lm_dir, prefs, tmp_path, lora):
    out = tmp_path / "dpo"
    extra = ["--lora", "--rank", "4", "--learning-rate", "1e-2"] if lora else ["--learning-rate", "1e-3"]
    figures = run(tiny_lm_dir, prefs, out, "--max-steps", "3", "--results", str(tmp_path / "results"), *extra)
    assert len(figures["log"]) == 3
    assert sorted(tensorboard_scalars(out / "tb", "train/loss")) == [1, 2, 3]  # TensorBoard by default, in <out>/tb
    for key in dpo.LOGGED:
        assert key in figures["last_log"], key
    assert 0 <= figures["held_out"]["accuracy"] <= 1 and figures["held_out"]["by_kind"].keys() == {"repetitive"}
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(figures))
    assert "implicit-reward accuracy" in (out / "summary.md").read_text()
    assert (tmp_path / "results" / "dpo.md").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged
    assert AutoTokenizer.from_pretrained(out / "model").chat_template is not None
    _, card = check_stage_record(out, "dpo")
    assert {"trl", "dpo", "custom_code"} <= set(card.data.tags)


def test_the_trainer_logs_to_tensorboard_and_trackio_offline(tiny_lm_dir, prefs, tmp_path, connections):
    out = tmp_path / "dpo"
    figures = run(tiny_lm_dir, prefs, out, "--max-steps", "3", "--report-to", "tensorboard,trackio")
    losses = {r["step"]: r["loss"] for r in figures["log"]}  # the trainer's log history
    assert tensorboard_scalars(out / "tb", "train/loss") == pytest.approx(losses)
    logged = trackio_logs(str(out))  # TrackioCallback logs without a step, with train/global_step
    assert {r["train/global_step"]: r["train/loss"] for r in logged if "train/loss" in r} == losses
    assert not (out / "trainer" / "runs").exists() and connections == []


def test_dpo_implicit_reward_accuracy_rises_above_chance(tiny_lm_dir, tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, n=200)  # 10 held-out pairs
    figures = run(tiny_lm_dir, data, tmp_path / "dpo", "--max-steps", "12", "--learning-rate", "2e-3", "--beta", "0.5")
    held = figures["held_out"]
    assert held["logp_accuracy_reference"] < 0.5  # the random start prefers the stutter: DPO must turn that around
    assert held["accuracy"] >= 0.8, held
    assert held["mean_margin"] > 0 and held["mean_reward_chosen"] > held["mean_reward_rejected"]
    assert figures["last_log"]["rewards/margins"] > figures["first_log"]["rewards/margins"]


def test_bad_loss_type_and_rows_fail_clearly(tiny_lm_dir, prefs, tmp_path):
    with pytest.raises(ValueError, match=r"--loss-type='dpo' is not one of \['sigmoid', 'hinge', 'ipo'"):
        run(tiny_lm_dir, prefs, tmp_path / "a", "--loss-type", "dpo")
    with pytest.raises(ValueError, match=r"--beta=0.0 must be > 0"):
        run(tiny_lm_dir, prefs, tmp_path / "b", "--beta", "0")
    with pytest.raises(ValueError, match="exo_pair needs --label-smoothing"):
        run(tiny_lm_dir, prefs, tmp_path / "c", "--loss-type", "exo_pair")
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
    bad.write_text("\n".join(json.dumps(r) for r in [good, {**good, "rejected": "A."}]))
    with pytest.raises(ValueError, match="row 1 has chosen == rejected"):
        run(tiny_lm_dir, bad, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_other_loss_types_train(tiny_lm_dir, prefs, tmp_path):
    figures = run(
        tiny_lm_dir, prefs, tmp_path / "ipo", "--max-steps", "1", "--loss-type", "ipo", "--learning-rate", "1e-3"
    )
    assert figures["loss_type"] == "ipo" and len(figures["log"]) == 1


def test_implicit_prompts_are_split_off(tiny_lm_dir, tmp_path):
    rows = []
    for i in range(40):
        question = {"role": "user", "content": f"What is module {i} about?"}
        rows.append(
            {
                "chosen": [question, {"role": "assistant", "content": f"It works with {TOPICS[i % 10]}."}],
                "rejected": [question, {"role": "assistant", "content": "the the the"}],
            }
        )
    data = tmp_path / "implicit.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    figures = run(tiny_lm_dir, data, tmp_path / "dpo", "--max-steps", "1", "--learning-rate", "1e-3")
    assert len(figures["log"]) == 1 and figures["held_out"]["by_kind"].keys() == {"all"}
    row = dpo.explicit_prompt({"prompt": [], **rows[0]})
    assert row["prompt"] == rows[0]["chosen"][:1] and row["rejected"] == rows[0]["rejected"][1:]
    with pytest.raises(ValueError, match="share no opening turn"):
        dpo.explicit_prompt(
            {
                "prompt": [],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "user", "content": "b"}],
            }
        )


def test_stock_llama_dpo_lora(stock_llama_dir, prefs, tmp_path):
    llama_dir = stock_llama_dir
    out = tmp_path / "dpo"
    figures = run(llama_dir, prefs, out, "--max-steps", "2", "--lora", "--rank", "4", "--learning-rate", "1e-3")
    assert len(figures["log"]) == 2
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
