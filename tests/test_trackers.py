"""training/trackers.py: one `--report-to` for every training stage. A name that is not a supported tracker, or a
tracker whose package is missing, fails before anything loads with one line; RunLog's TensorBoard hides the steps a
resumed run logs again, and its trackio run holds exactly the records of metrics.jsonl, offline.
(End to end: tests/test_pretrain.py for our loop, tests/test_dpo.py for a TRL stage.)"""

import importlib.util
import json

import pytest
from conftest import tensorboard_scalars, trackio_logs

from tiny_hf import cli
from training.run_log import RunLog, read_metrics
from training.trackers import REPORT_TO, check_report_to

BOGUS = f"--report-to 'bogus' is not one of {list(REPORT_TO)} (or several, comma-separated)"


def test_report_to_takes_one_name_several_or_none():
    assert check_report_to("tensorboard") == ["tensorboard"]
    assert check_report_to("tensorboard, trackio,tensorboard") == ["tensorboard", "trackio"]
    assert check_report_to(["trackio"]) == ["trackio"]  # TrainingArguments holds a list
    assert check_report_to("none") == check_report_to([]) == check_report_to(None) == []
    with pytest.raises(ValueError) as error:
        check_report_to("tensorboard,bogus")
    assert str(error.value) == BOGUS


@pytest.fixture
def without_wandb(monkeypatch):
    """wandb as if it were not installed (it is not here, but the test must not depend on that)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))


def test_a_tracker_that_is_not_installed_says_what_to_install(without_wandb):
    with pytest.raises(ValueError, match=r"^--report-to wandb needs the wandb package: pip install wandb$"):
        check_report_to("wandb")


def fails_with(argv: list[str], capsys) -> list[str]:
    """The stderr lines of `tiny-hf ARGV`, which must exit with code 2."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


# Our loops (pretrain, ppo) and the Trainer stages (lora; sft, dpo through alignment.place_trainer_output).
STAGES = {"pretrain": [], "ppo": ["--reward-fn", "exact_match"], "lora": [], "sft": [], "dpo": []}


@pytest.mark.parametrize("stage", STAGES)
def test_an_unknown_tracker_is_one_line_and_exit_2(stage, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [stage, *STAGES[stage], "--model", str(tmp_path / "no-model"), "--out", str(out), "--report-to", "bogus"]
    assert fails_with(argv, capsys) == [f"tiny-hf {stage}: error: {BOGUS}"]
    assert not out.exists()  # nothing was loaded or written


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_a_missing_wandb_is_one_line(stage, tmp_path, capsys, without_wandb):
    argv = [stage, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--report-to", "wandb"]
    assert fails_with(argv, capsys) == [
        f"tiny-hf {stage}: error: --report-to wandb needs the wandb package: pip install wandb"
    ]


def test_tensorboard_hides_the_steps_a_resumed_run_logs_again(tmp_path):
    with RunLog(tmp_path) as log:
        for step in range(1, 6):
            log.log({"step": step, "loss": 1 / step, "samples": ["not a number"]})
    with RunLog(tmp_path, start_step=3) as log:  # the checkpoint was at step 3: steps 4 and 5 run again
        log.log({"step": 4, "loss": 0.9})
        log.text("sample", "some text", 4)
    assert tensorboard_scalars(tmp_path / "tb", "loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.9})


def test_trackio_holds_the_records_of_metrics_jsonl_offline(tmp_path, connections):
    (tmp_path / "run_config.json").write_text(json.dumps({"lr": 0.01}))
    with RunLog(tmp_path, report_to="trackio") as log:
        for step in range(1, 4):
            log.log({"step": step, "loss": 1 / step, "lr": 0.01, "note": "words stay in metrics.jsonl"})
    logged = trackio_logs(str(tmp_path))
    assert [{k: r[k] for k in ("step", "loss", "lr")} for r in logged] == [
        {k: r[k] for k in ("step", "loss", "lr")} for r in read_metrics(tmp_path)
    ]
    assert not (tmp_path / "tb").exists() and connections == []
