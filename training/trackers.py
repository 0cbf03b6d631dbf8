"""Experiment trackers, one option for every training stage: `--report-to tensorboard|trackio|wandb|none` (several
comma-separated, e.g. `tensorboard,trackio`; default tensorboard).

Where each one writes:
- tensorboard: event files in `<out>/tb` (`tensorboard --logdir <out>/tb`).
- trackio: trackio's local SQLite database (`$TRACKIO_DIR`, default `~/.cache/huggingface/trackio`), project
  "tiny-hf", one run named after the output folder (`trackio show --project tiny-hf`). Nothing leaves the machine
  unless TRACKIO_SPACE_ID or TRACKIO_SERVER_URL is set.
- wandb: the W&B project "tiny-hf" (wandb's own settings decide online or offline), run files in `<out>/wandb`.

Our own loops (pretraining, PPO) log through `training.run_log.RunLog`, which holds Accelerate's tracker classes
opened here. The Trainer stages (transformers' and TRL's: lora, sft, reward, dpo, grpo) use the Trainer's own
integrations, named by `TrainingArguments.report_to`; `place_trainer_reports` checks that option the same way and
`trainer_tensorboard_dir` puts their TensorBoard files in `<out>/tb` too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

REPORT_TO = ("tensorboard", "trackio", "wandb", "none")
PROJECT = "tiny-hf"  # the trackio / wandb project of every stage; a run is named after its output folder
TENSORBOARD_DIR = "tb"  # inside the run's output folder


def check_report_to(value: str | list[str] | None) -> list[str]:
    """The trackers `--report-to` names, in order, without repeats or "none".

    Args:
        value: A name, comma-separated names, or a list of them (TrainingArguments turns its value into a list).

    Raises:
        ValueError: for a name not in `REPORT_TO` (the message lists them), or a tracker whose package is not
            installed (the message says what to pip install), so that the run stops before anything loads.
    """
    items = [value] if isinstance(value, str) else list(value or [])
    names = []
    for name in (part.strip() for item in items for part in item.split(",")):
        if name not in REPORT_TO:
            raise ValueError(f"--report-to {name!r} is not one of {list(REPORT_TO)} (or several, comma-separated)")
        if name == "none" or name in names:
            continue
        if importlib.util.find_spec(name) is None:  # the package has the tracker's name
            raise ValueError(f"--report-to {name} needs the {name} package: pip install {name}")
        names.append(name)
    return names


def open_tracker(name: str, out: Path, start_step: int, config: dict | None):
    """Accelerate's tracker `name` for the run folder `out`, started.

    Args:
        name: One of `REPORT_TO` but "none".
        out: The run folder: TensorBoard writes in `<out>/tb`, wandb in `<out>/wandb`; the trackio and wandb run
            is named after it.
        start_step: The step a resumed run continues after (0 for a fresh run). TensorBoard hides its events after
            that step, since they are logged again; trackio continues the run of that name instead of starting a
            new one (it keeps the repeated steps: metrics.jsonl and TensorBoard are the exact record).
        config: The run's options, stored with the trackio / wandb run.
    """
    from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

    if name == "tensorboard":
        tracker = TensorBoardTracker(TENSORBOARD_DIR, out, purge_step=start_step + 1 if start_step else None)
    elif name == "trackio":
        tracker = TrackioTracker(PROJECT, name=str(out), config=config, resume="allow" if start_step else "never")
    elif name == "wandb":
        tracker = WandBTracker(PROJECT, name=str(out), config=config, dir=str(out))
    else:
        raise ValueError(f"no tracker {name!r}: one of {list(REPORT_TO[:-1])}")
    tracker.start()
    return tracker


def place_trainer_reports(config, out: Path) -> None:
    """Check a Trainer stage's `--report-to` (`config` is its TrainingArguments) before anything loads, and name its
    trackio / wandb run after the output folder `out` unless `--run-name` was given."""
    config.report_to = check_report_to(config.report_to)
    config.run_name = config.run_name or str(out)


@contextlib.contextmanager
def trainer_tensorboard_dir(out: Path):
    """Build a transformers Trainer inside this to put its TensorBoard files in `<out>/tb`. transformers 5 has no
    `logging_dir` argument: its TensorBoard callback reads TENSORBOARD_LOGGING_DIR when the Trainer creates it (and
    without it writes to `<output_dir>/runs/<date>_<host>`). The variable is restored afterwards."""
    saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(out) / TENSORBOARD_DIR)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = saved
