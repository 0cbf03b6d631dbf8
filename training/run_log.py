"""A run's log, shared by pretraining and PPO: `metrics.jsonl` (one JSON record per line, each with its `step`),
always written (later stages and the report card read it), and the trackers `--report-to` names (training/trackers.py:
TensorBoard event files in `tb/` by default, trackio, wandb), plus the run's `run_config.json`.

A resumed run repeats the steps after its checkpoint, so metrics.jsonl and TensorBoard are first cut back to that
step: the records read afterwards are those of one uninterrupted run. Every record is flushed as it is written, so
a killed run loses at most a torn last line, which `read_metrics` drops.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tiny_hf.system import write_atomic
from training.trackers import TENSORBOARD_DIR as TENSORBOARD_DIR
from training.trackers import check_report_to, open_tracker

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl`, in file order.

    Args:
        run_dir: A run folder (holding `metrics.jsonl`) or the path of a metrics file itself.

    Returns:
        One dict per non-empty line. A torn last line (a run killed mid-write) is dropped; a bad line elsewhere is
        a ValueError naming the file and line.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not JSON: {error}") from None
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of `path` up to `step` (none for 0), replacing the file atomically."""
    if not path.exists():
        return
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step))


def read_run_config(folder: str | Path) -> dict | None:
    """A folder's `run_config.json`, or None if it has none."""
    path = Path(folder) / RUN_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def find_pretraining_run(folders: list[Path]) -> Path | None:
    """The first of `folders` that is a pretraining run folder (its run_config.json has the data spec and block
    size), following a later stage's `base_run` (the run it started from) back to one; None if none is."""
    for folder in folders:
        config = read_run_config(folder)
        if config is None:
            continue
        if config.get("stage", "pretrain") == "pretrain" and {"data", "block_size"} <= set(config):
            return Path(folder)
        if config.get("base_run"):
            return find_pretraining_run([Path(config["base_run"])])
    return None


def write_run_config(out: Path, options, **extra) -> None:
    """`run_config.json`: the run's options (a dataclass) and `extra` facts, which later stages read back."""
    config = {**dataclasses.asdict(options), **extra}
    (Path(out) / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))


class RunLog:
    """The metrics file and the trackers of the run folder `out`, continuing after step `start_step`.

    Args:
        out: The run folder.
        start_step: The step the run starts after (0 for a fresh run): later records are dropped from
            metrics.jsonl and hidden in TensorBoard, since those steps run again.
        active: False on the processes that do not log (all but rank 0); then every method does nothing.
        report_to: The trackers beside metrics.jsonl (`--report-to`: "tensorboard", "trackio", "wandb", several
            comma-separated, or "none"); checked on every process, so a bad name fails everywhere alike.
    """

    def __init__(self, out: Path, start_step: int = 0, *, active: bool = True, report_to: str = "tensorboard"):
        self.path = Path(out) / METRICS_FILE
        self._file, self._trackers = None, []
        names = check_report_to(report_to)
        if not active:
            return
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        config = read_run_config(out)  # written before the log opens: the trackio / wandb run's config
        self._trackers = [open_tracker(name, Path(out), start_step, config) for name in names]

    def log(self, record: dict) -> None:
        """One record (with its "step"): a line of metrics.jsonl, and its numbers to every tracker."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if numbers:
            for tracker in self._trackers:
                tracker.log(numbers, step=record["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        """Text for the trackers (generated samples; TensorBoard shows them in its text tab)."""
        for tracker in self._trackers:
            tracker.log({tag: text}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            for tracker in self._trackers:
                tracker.finish()
            self._file, self._trackers = None, []

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
