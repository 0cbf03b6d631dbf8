"""Run folders: where a stage's `--model` loads from.

A training stage writes a run folder with the exported model in `model/` beside its report files (summary.json,
metrics.jsonl, plots); every later stage takes a run folder, a model folder or a Hub id for `--model`, or the short
name of a model `tiny-hf fetch` downloads (`--model smollm2` is `runs/smollm2`).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

MODEL_SUBFOLDER = "model"  # where training/pretrain.py exports the model inside a run folder
RUNS_DIR = Path("runs")  # where stages put their run folders by default (relative to the working directory)
# The names `tiny-hf fetch NAME` knows (training/fetch.py's PRETRAINED has how), and what each one is: `--model NAME`
# loads the run folder that fetch writes, RUNS_DIR/NAME.
FETCHED_MODELS = {"smollm2": "SmolLM2-135M-Instruct"}


def resolve_model(model: str) -> tuple[str, list[Path]]:
    """Where to load `model` from, and the folders to look in for the run's report files.

    A local run folder (one with a `model/` subfolder) loads that subfolder; a local model folder loads itself
    (a pushed model keeps the report files beside its weights, a run folder's `model/` has them one level up);
    a name of `FETCHED_MODELS` that is not a local folder is its run folder in RUNS_DIR, which `tiny-hf fetch NAME`
    makes (a FileNotFoundError says so while it is missing); anything else must be a Hub id (`check_hub_id`).
    """
    path = Path(model).expanduser()
    if model in FETCHED_MODELS and not path.exists():
        path = fetched_run_dir(model)
        if not (path / MODEL_SUBFOLDER / "config.json").is_file():
            raise FileNotFoundError(
                f"{FETCHED_MODELS[model]} is not fetched (no {path / MODEL_SUBFOLDER}): run `tiny-hf fetch {model}`"
            )
    if (path / MODEL_SUBFOLDER / "config.json").is_file():
        return str(path / MODEL_SUBFOLDER), [path]
    if (path / "config.json").is_file():
        return str(path), [path, path.parent]
    if path.exists():
        raise FileNotFoundError(f"the folder has neither config.json nor {MODEL_SUBFOLDER}/config.json")
    check_hub_id(model)
    return model, []


def fetched_run_dir(name: str) -> Path:
    """The run folder of a fetched model: RUNS_DIR/NAME (`tiny-hf fetch NAME` writes its model/)."""
    return RUNS_DIR / name


def check_hub_id(model: str) -> None:
    """Refuse, before any download, a name that is neither a local folder nor a Hub id that can load: a path
    that does not exist, a malformed id, or (offline) an id that is not in the local Hub cache."""
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise FileNotFoundError(f"no such folder {model!r}")
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(f"{model!r} is neither a local folder nor a Hub id (namespace/name)") from None
    if constants.is_offline_mode() and try_to_load_from_cache(model, "config.json") is None:
        raise FileNotFoundError(
            f"{model!r} is not a local folder and the Hub id is not in the cache ({constants.HF_HUB_CACHE}) while "
            f"offline (HF_HUB_OFFLINE=1): run `hf download {model}` where the Hub is reachable, or pass a local folder"
        )


def model_path(flag: str, name: str) -> str:
    """Where a stage's `--model` / `--reward-model` loads from (`resolve_model`: a run folder's model/, a model
    folder or a Hub id); a local folder without a model in it is a ValueError that names the flag."""
    try:
        return resolve_model(name)[0]
    except FileNotFoundError as error:
        raise ValueError(f"{flag} {name}: {error}") from None
