"""Serving: the OpenAI-compatible server (app/server.py) and the Gradio demo (app/demo.py), both on tiny_hf.engine."""

from __future__ import annotations

from pathlib import Path

MODEL_SUBFOLDER = "model"  # where training/pretrain.py exports the model inside a run folder


def resolve_model(model: str) -> tuple[str, list[Path]]:
    """Where to load `model` from, and the folders to look in for the run's report files.

    A local run folder (one with a `model/` subfolder) loads that subfolder; a local model folder loads itself
    (a pushed model keeps the report files beside its weights, a run folder's `model/` has them one level up);
    anything else is passed on as a Hub id.
    """
    path = Path(model).expanduser()
    if (path / MODEL_SUBFOLDER / "config.json").is_file():
        return str(path / MODEL_SUBFOLDER), [path]
    if (path / "config.json").is_file():
        return str(path), [path, path.parent]
    if path.exists():
        raise FileNotFoundError(f"the folder has neither config.json nor {MODEL_SUBFOLDER}/config.json")
    return model, []


def load_rag_index(path: str):
    """The `rag.index.RagIndex` in the folder `path` (the scripts' --rag-index); a missing or damaged folder exits
    with a one-line error."""
    from rag.index import RagIndex

    try:
        return RagIndex.load(path)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SystemExit(f"error: cannot load --rag-index {path!r}: {reason}") from None
