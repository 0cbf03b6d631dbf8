"""A run's log, shared by pretraining and PPO: `metrics.jsonl` (one JSON record per line, each with its `step`) and
TensorBoard event files in `tb/`, plus the run's `run_config.json`.

A resumed run repeats the steps after its checkpoint, so both logs are first cut back to that step: the records
read afterwards are those of one uninterrupted run. Every record is flushed as it is written, so a killed run loses
at most a torn last line, which `read_metrics` drops.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tiny_hf.system import write_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
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


def write_run_config(out: Path, options, **extra) -> None:
    """`run_config.json`: the run's options (a dataclass) and `extra` facts, which later stages read back."""
    config = {**dataclasses.asdict(options), **extra}
    (Path(out) / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))


class RunLog:
    """The metrics file and TensorBoard writer of the run folder `out`, continuing after step `start_step`.

    Args:
        out: The run folder.
        start_step: The step the run starts after (0 for a fresh run): later records are dropped from
            metrics.jsonl and hidden in TensorBoard, since those steps run again.
        active: False on the processes that do not log (all but rank 0); then every method does nothing.
    """

    def __init__(self, out: Path, start_step: int = 0, *, active: bool = True):
        self.path = Path(out) / METRICS_FILE
        self._file = self._writer = None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        truncate_metrics(self.path, start_step)
        self._writer = SummaryWriter(Path(out) / TENSORBOARD_DIR, purge_step=start_step + 1 if start_step else None)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    def log(self, record: dict) -> None:
        """One record (with its "step"): a line of metrics.jsonl, and a TensorBoard scalar per number in it."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, record["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        """Text for TensorBoard's text tab (generated samples)."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._writer.close()
            self._file = self._writer = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
