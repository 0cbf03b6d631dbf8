"""Checkpoints of a training run: `<out>/checkpoints/step-N` folders, written atomically and loaded back verified.

A checkpoint is written into a temporary folder that is renamed only when complete, so a run killed mid-save (or a
write that fails, e.g. a full disk) leaves the previous checkpoint and no half-written one; the last K are kept.
Its last file is `manifest.json` (every file's size and sha256); resuming verifies it and falls back, with a
one-line warning, past a damaged checkpoint to the newest intact one. Tensor files are read with
`weights_only=True` (plain tensors and containers, never pickled code), weights as safetensors with a check that
they fit the model (a tied LM head is stored once, as the embedding). Pretraining and PPO use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # the loop's state; a folder without it is not a checkpoint
MANIFEST_FILE = "manifest.json"  # written last: {file name: {"bytes", "sha256"}} of everything else
LOCK_FILE = ".run.lock"  # held by the run writing into the folder (RunLock)


class RunLock:
    """Holds `<out>/.run.lock` while a run writes into `out`: a second run into the same folder (a resume started while
    the first still runs, or while a SIGKILLed launcher's ranks still write) is refused instead of mixing checkpoints.
    It is an OS lock (flock), so it goes with the process that holds it however that ends; rank 0 takes it.
    """

    def __init__(self, out: Path):
        self.out, self.handle = Path(out), None

    def __enter__(self) -> RunLock:
        if int(os.environ.get("RANK", "0")) != 0:
            return self
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            handle = open(self.out / LOCK_FILE, "a+")
        except OSError as error:
            raise ValueError(f"--out {self.out} is not writable: {error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            message = f"--out {self.out} is in use by a running run ({holder}): stop it or choose another --out"
            raise ValueError(message) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file releases the lock
            self.handle = None


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIR / f"step-{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in `<out>/checkpoints` (one with trainer_state.json); temporary folders and
    ones cut off mid-save are ignored."""
    done = [p for p in sorted((Path(out) / CHECKPOINTS_DIR).glob("step-*")) if (p / STATE_FILE).exists()]
    return done[-1] if done else None


def resume_point(out: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from: with `--resume`, the newest one that passes `verify` (None when there is
    none yet), each damaged newer one skipped with a one-line warning; without it, a folder that already has
    checkpoints is an error, so a run never overwrites another by accident."""
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise ValueError(f"{out} already has checkpoints ({latest.name}): pass --resume to continue, or a new --out")
    if not resume:
        return None
    candidates = [p for p in sorted((Path(out) / CHECKPOINTS_DIR).glob("step-*"), reverse=True) if p.is_dir()]
    for i, path in enumerate(candidates):
        problem = verify(path)
        if problem is None:
            return path
        fallback = candidates[i + 1].name if i + 1 < len(candidates) else "the start (no intact checkpoint left)"
        print(f"warning: checkpoint {path.name} is damaged ({problem}); resuming from {fallback}", file=sys.stderr)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: the size and sha256 of every file in `folder` (written last, atomically)."""
    from tiny_hf.system import write_atomic

    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    write_atomic(folder / MANIFEST_FILE, json.dumps({"files": files}, indent=1) + "\n")


def verify(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (no or unparsable manifest or state, a file missing, cut short or
    changed), or None when every file matches its manifest."""
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return f"its manifest or {STATE_FILE} does not parse: {error}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def write_checkpoint(
    out: Path,
    step: int,
    save: Callable[[Path], None],
    *,
    state: dict,
    keep_last: int,
    main_process: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> Path:
    """Write `<out>/checkpoints/step-N` atomically and keep the last `keep_last`.

    Args:
        save: Writes the run's files into the folder it is given (every process calls it; it decides who writes).
        state: The loop's JSON-able state, saved with `step` as trainer_state.json after everything else.
        main_process / wait_for_everyone: The distributed run's rank-0 flag and barrier (defaults: one process).
    """
    final = checkpoint_dir(out, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait_for_everyone()
    try:
        save(tmp)
        wait_for_everyone()
        if main_process:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
            write_manifest(tmp)
    except BaseException:  # a failed write (a full disk) leaves the previous checkpoints and no half-written one
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(final.parent.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old)
    wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    """The loop's state saved with a checkpoint (its `step` included)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


# --- tensors, weights, optimizer, RNG --------------------------------------------------------------------------------
def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path):
    """A tensor file as plain tensors and containers: `weights_only=True` never runs pickled code."""
    if not Path(path).is_file():
        raise ValueError(f"checkpoint file {path} is missing: the checkpoint is damaged")
    return torch.load(path, weights_only=True)


def load_weights(path: Path, model: torch.nn.Module, hint: str = "it is damaged") -> None:
    """Load `<path>/model.safetensors` into `model`, refusing weights that do not fit it."""
    weights = Path(path) / "model.safetensors"
    if not weights.exists():
        raise ValueError(f"checkpoint {path} has no model.safetensors: {hint}")
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}")


def optimizer_file(folder: Path, rank: int | None = None) -> Path:
    """optimizer.pt, or optimizer-<rank>.pt where each process holds its own shard (FSDP)."""
    return Path(folder) / ("optimizer.pt" if rank is None else f"optimizer-{rank}.pt")


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, rank: int = 0) -> None:
    shard = optimizer_file(path, rank)
    optimizer.load_state_dict(load_torch(shard if shard.exists() else optimizer_file(path)))


def rng_state() -> dict:
    """Python's, NumPy's, torch's and CUDA's generator states as tensors and plain values (loadable weights-only)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(folder: Path, rank: int = 0) -> None:
    save_torch(rng_state(), Path(folder) / f"rng-{rank}.pt")  # each process has its own generators


def load_rng(folder: Path, rank: int = 0) -> None:
    set_rng_state(load_torch(Path(folder) / f"rng-{rank}.pt"))


# --- stopping on request ---------------------------------------------------------------------------------------------
class StopRequest:
    """Turns SIGTERM (what `kill`, schedulers and service managers send) into a request the training loop reads
    between steps, so it can write a checkpoint and exit 0 instead of dying mid-step. Use as a context manager."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
