"""What the two app commands (`tiny-hf serve`, `tiny-hf chat`) share: their model, listening and retrieval options,
and loading the engine, where a model that does not load is one line that says why, not a traceback."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tiny_hf.engine import Engine
from tiny_hf.runs import FETCHED_MODELS, resolve_model

# What a model that does not load raises: a missing folder or Hub id (OSError), a model the engine cannot run
# (TypeError), a damaged config (ValueError).
LOAD_ERRORS = (OSError, TypeError, ValueError)


@dataclass
class ModelOptions:
    _argument_group_name = "model"

    model: str = field(
        default="runs/demo",
        metadata={
            "help": "a run folder (its model/), a model folder, a Hub id, or a model `tiny-hf fetch NAME` downloads: "
            + ", ".join(f"{name} ({what})" for name, what in FETCHED_MODELS.items())
        },
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)"})
    max_seq_len: int | None = field(default=None, metadata={"help": "context window (default: the model's)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run a model folder's own code"})


@dataclass
class ListenOptions:
    _argument_group_name = "server"

    host: str = field(default="127.0.0.1", metadata={"help": "0.0.0.0 makes it reachable from other machines"})
    port: int = field(default=8000, metadata={"help": "the port to listen on"})


@dataclass
class RetrievalOptions:
    _argument_group_name = "retrieval"

    rag_index: str | None = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "an index folder (tiny-hf index): grounded answers (the server's POST /v1/rag/answer, the app's "
            "Ask the docs tab)",
        },
    )


def load_engine(model: str, **engine_kwargs) -> tuple[Engine, list[Path]]:
    """The engine for `model` (see `tiny_hf.runs.resolve_model`) and the folders that may hold its report files.

    Raises:
        FileNotFoundError / OSError: `model` is neither a local model nor a loadable Hub id.
        TypeError: the model is not one the engine runs (TinyForCausalLM-style).
    """
    name_or_path, run_dirs = resolve_model(model)
    return Engine.from_pretrained(name_or_path, **engine_kwargs), run_dirs


def cannot_load(model: str, error: BaseException) -> SystemExit:
    """The one-line exit for a `--model` that did not load (one of `LOAD_ERRORS`): the first line of the reason, and
    for the default run folder, missing, how to make it."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if model == ModelOptions.model and not Path(model).exists():
        reason += " (`make demo` trains one there)"
    return SystemExit(f"error: cannot load --model {model!r}: {reason}")
