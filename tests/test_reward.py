"""The reward model: preference data is checked before training, a short RewardTrainer run on a tiny model learns
to prefer the chosen answers on held-out pairs, and the exported model scores the same in a fresh process without
tiny_hf."""

import json

import pytest
from conftest import check_stage_record, run_without_tiny_hf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignment import reward
from alignment.data import load_preference_dataset

TOPICS = ["lists", "files", "sockets", "threads", "dates", "paths", "json", "regexes", "queues", "sets"]


def write_preferences(path, n: int = 80) -> None:
    """Pairs a tiny model can learn to tell apart: a varied sentence (chosen) against a stutter (rejected)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is module {i} about?"}],
                "chosen": [{"role": "assistant", "content": f"It works with {topic} and returns a new object."}],
                "rejected": [{"role": "assistant", "content": " ".join(["the the"] * (3 + i % 4))}],
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows))


def test_preference_rows_are_checked_before_training(tmp_path):
    good = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
    cases = [
        ({**good, "rejected": "A."}, "chosen == rejected"),
        ({**good, "chosen": ""}, "empty or missing 'chosen'"),
        ({"prompt": "Q?", "chosen": "A."}, "row 2 has an empty or missing 'rejected'"),
    ]
    for i, (row, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in [good, good, row]))
        with pytest.raises(ValueError, match=match):
            load_preference_dataset(str(path))
    path = tmp_path / "no_rejected.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "A."}))
    with pytest.raises(ValueError, match=r"need 'chosen' and 'rejected'; \['rejected'\] missing"):
        load_preference_dataset(str(path))
    path = tmp_path / "strings.jsonl"
    path.write_text("\n".join(json.dumps({**good, "chosen": f"A{i}."}) for i in range(20)))
    ds = load_preference_dataset(str(path))  # strings become conversations; no test split: one is made
    assert ds["train"][0]["prompt"] == [{"role": "user", "content": "Q?"}]
    assert ds["train"][0]["rejected"] == [{"role": "assistant", "content": "B."}]
    assert ds["validation"].num_rows == 1


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_reward_model_learns_held_out_preferences_and_loads_without_tiny_hf(tiny_lm_dir, tmp_path, lora):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data)
    out = tmp_path / "reward"
    extra = ["--lora", "--rank", "8", "--learning-rate", "3e-3"] if lora else ["--learning-rate", "1e-3"]
    figures = reward.main(
        [
            "--model",
            str(tiny_lm_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-steps",
            "30",
            "--per-device-train-batch-size",
            "8",
            "--warmup-steps",
            "2",
            "--max-length",
            "128",
            "--results",
            str(tmp_path / "results"),
            *extra,
        ]
    )
    assert figures["after"]["accuracy"] >= 0.9, figures
    assert figures["last_train_loss"] < figures["first_train_loss"]
    assert (out / "margins.png").stat().st_size > 0 and (tmp_path / "results" / "reward_model.md").exists()
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(figures))
    _, card = check_stage_record(out, "reward")
    assert card.data.pipeline_tag == "text-classification" and "AutoModelForSequenceClassification" in card.text

    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    held_out = list(load_preference_dataset(str(data))["validation"])
    conversations = [r["prompt"] + r["chosen"] for r in held_out]
    expected = reward.rewards(model, tokenizer, conversations, 128).tolist()
    (tmp_path / "expected.json").write_text(json.dumps({"conversations": conversations, "scores": expected}))
    result = run_without_tiny_hf(
        f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        folder = {str(out / "model")!r}
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        data = json.load(open("expected.json"))
        ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in data["conversations"]]
        batch = tokenizer.pad({{"input_ids": ids}}, return_tensors="pt")
        with torch.no_grad():
            scores = model(**batch).logits[:, 0]
        assert torch.allclose(scores, torch.tensor(data["scores"]), atol=1e-5), (scores, data["scores"])
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_bad_arguments_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="--max-steps=0 must be at least 1"):
        reward.main(["--max-steps", "0"])
    with pytest.raises(ValueError, match="--center-rewards-coefficient=-1.0"):
        reward.main(["--center-rewards-coefficient", "-1"])
    with pytest.raises(ValueError, match="neither config.json"):
        reward.main(["--model", str(tmp_path)])


def test_pairs_longer_than_max_length_everywhere_fail_early(tiny_lm_dir, tmp_path):
    write_preferences(tmp_path / "prefs.jsonl")
    with pytest.raises(ValueError, match="every training pair is longer than --max-length=8 tokens"):
        reward.main(["--model", str(tiny_lm_dir), "--data", str(tmp_path / "prefs.jsonl"), "--max-length", "8"])
