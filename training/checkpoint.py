"""Checkpoints of a training run: `<out>/checkpoints/step-N` folders, written atomically and loaded back verified.

A checkpoint is written into a temporary folder that is renamed only when complete (`trainer_state.json` last), so
a run killed mid-save leaves the previous checkpoint and no half-written one; the last K are kept. Tensor files
are read with `weights_only=True` (plain tensors and containers, never pickled code), weights as safetensors with a
check that they fit the model (a tied LM head is stored once, as the embedding). Pretraining and PPO use it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last: a folder without it is not a checkpoint


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIR / f"step-{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in `<out>/checkpoints` (one with trainer_state.json); temporary folders and
    ones cut off mid-save are ignored."""
    done = [p for p in sorted((Path(out) / CHECKPOINTS_DIR).glob("step-*")) if (p / STATE_FILE).exists()]
    return done[-1] if done else None


def resume_point(out: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from: the latest one with `--resume` (None when there is none yet); without it,
    a folder that already has checkpoints is an error, so a run never overwrites another by accident."""
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise ValueError(f"{out} already has checkpoints ({latest.name}): pass --resume to continue, or a new --out")
    return latest if resume else None


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
    save(tmp)
    wait_for_everyone()
    if main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
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
