"""Upload any stage's output to the Hugging Face Hub as a model that loads without tiny_hf.

    tiny-hf push --model runs/demo --repo-id you/tiny-demo --dry-run   # build runs/demo-upload, stop
    tiny-hf push --model runs/demo --repo-id you/tiny-demo             # build it, then upload it
    tiny-hf push --model runs/sft --repo-id you/tiny-sft               # SFT, DPO, PPO, GRPO, reward, LoRA, fetch

The staging folder (`--out`, default `<run>-upload` beside the run) holds exactly what is uploaded:
- the model: a tiny_hf model re-exported with `tiny_hf.export` (weights, a config whose `auto_map` names every Auto
  class, the tokenizer and tiny_hf's model source files, so `from_pretrained(repo, trust_remote_code=True)` works
  for people who do not have tiny_hf; a run saved with plain `save_pretrained` gets them too); a stock model
  (`tiny-hf fetch`, `tiny-hf export --format llama`) or a PEFT adapter (`tiny-hf lora`'s adapter/) as it is;
- the run's plots (*.png), metrics.jsonl and summary.md;
- README.md, the model card (training/model_card.py): metadata, usage, evaluation, architecture, training setup.
The rest of the run folder (checkpoints, TensorBoard logs, run_config.json with its local paths) stays home.
The upload is one commit that makes the repo mirror the staging folder: remote files it lacks are deleted.

Uploading needs a token (`hf auth login`, or HF_TOKEN) and HF_HUB_OFFLINE unset; the Makefile exports
HF_HUB_OFFLINE=1, so run this outside make.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import tiny_hf  # registers model_type "tiny" with the Auto classes
from tiny_hf.options import parse_options
from training import model_card

# Written into the staging folder so a later run may replace it; never uploaded. A non-empty folder without it is
# not ours, and we refuse to delete it.
STAGING_MARKER = ".tiny-hf-staging"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
RUN_FILES = ("metrics.jsonl", "summary.md")  # copied beside the model, with every *.png of the run folder
# The model folders a stage leaves in its output folder, in the order push looks for them (LoRA: merged, adapter).
MODEL_FOLDERS = ("model", "merged", "adapter")


@dataclass
class PushOptions:
    # what to upload, where to
    model: Path = field(metadata={"help": "a run folder (with model/) or a model folder"})
    repo_id: str = field(metadata={"help": "owner/name on the Hub"})
    private: bool = field(default=False, metadata={"help": "create the repo private (an existing repo keeps its)"})
    license: str = field(default="apache-2.0", metadata={"help": "license id for the model card"})
    commit_message: str | None = field(default=None, metadata={"help": "default: 'Upload <run> with tiny-hf'"})
    # output
    out: Path | None = field(default=None, metadata={"help": "staging folder (default: <run>-upload beside it)"})
    dry_run: bool = field(default=False, metadata={"help": "build the staging folder, print it, upload nothing"})


# --- checks: all of them run before anything is written ------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is `owner/name` with characters the Hub accepts, else raise a ValueError."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id {repo_id!r} is not of the form owner/name (e.g. 'you/tiny-demo')")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--repo-id {repo_id!r} is not a valid Hub repo id: {error}") from None
    return repo_id


def find_model_dir(run_dir: Path) -> Path:
    """The model folder of a stage's output folder (`model/`, LoRA's `merged/` or `adapter/`), or `run_dir` itself
    if it is a model folder."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--model {run_dir}: no such run folder")
    for candidate in (*(run_dir / name for name in MODEL_FOLDERS), run_dir):
        has_model = (candidate / "config.json").is_file() and any((candidate / f).is_file() for f in WEIGHT_FILES)
        if has_model or (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no model in {run_dir}: expected config.json and one of {WEIGHT_FILES} (or a PEFT adapter) in "
        f"{run_dir}/{{{','.join(MODEL_FOLDERS)}}} or {run_dir}"
    )


def find_tokenizer_dir(run_dir: Path, model_dir: Path) -> Path:
    """The tokenizer beside the model, or the run's `tokenizer/` folder (pretrain.py trains one there)."""
    for candidate in (model_dir, run_dir / "tokenizer"):
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer in {model_dir} or {run_dir / 'tokenizer'}: without one the uploaded model is unusable"
    )


def check_staging_dir(out: Path) -> None:
    """`out` must be absent, empty, or a staging folder an earlier push.py built (which it may replace)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / STAGING_MARKER).exists():
        raise FileExistsError(f"--out {out} is not empty and was not built by push.py; remove it or choose another")


# --- staging and upload --------------------------------------------------------------------------------------------
def stage(run_dir: Path, repo_id: str, out: Path, license: str = "apache-2.0") -> Path:
    """Build in `out` exactly what will be uploaded (see the module docstring). Every check runs before `out` is
    touched; an earlier staging folder there is replaced.

    Args:
        run_dir: The run folder (or a model folder).
        repo_id: `owner/name`.
        out: The staging folder.
        license: A Hub license id for the card.

    Returns:
        `out`.
    """
    check_repo_id(repo_id)
    model_dir = find_model_dir(run_dir)
    remote = model_card.is_remote_code(model_dir)
    tokenizer_dir = find_tokenizer_dir(run_dir, model_dir) if remote else None
    check_staging_dir(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / STAGING_MARKER).write_text("built by training/push.py; replaced on the next run, never uploaded\n")
    if remote:
        export_remote_code(model_dir, tokenizer_dir, out)
    else:  # a stock model or a PEFT adapter loads without tiny_hf as it is
        for file in model_dir.iterdir():
            if file.is_file() and file.name != model_card.CARD_FILE:
                shutil.copyfile(file, out / file.name)
    images = sorted(p.name for p in run_dir.glob("*.png"))
    for name in images + [f for f in RUN_FILES if (run_dir / f).is_file()]:
        shutil.copyfile(run_dir / name, out / name)
    card = model_card.build_model_card(run_dir, out, repo_id, license=license)
    card.save(out / model_card.CARD_FILE)
    return out


def export_remote_code(model_dir: Path, tokenizer_dir: Path, out: Path) -> None:
    """Re-export a tiny_hf model with `tiny_hf.export` (weights, auto_map, tokenizer and source files)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # trust_remote_code=False: use the installed tiny_hf classes (whose source export copies), even where the
    # folder's config carries an auto_map from an earlier export.
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    classifier = (config.architectures or [""])[0].endswith("ForSequenceClassification")
    loader = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = loader.from_pretrained(model_dir, trust_remote_code=False)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    tiny_hf.export(model, tokenizer, out)


def upload(staging: Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Create the repo if needed and make it hold exactly the staging folder, in one commit; returns the commit URL.

    Args:
        staging: A folder built by `stage`.
        repo_id: `owner/name`.
        private: Create the repo private (an existing repo keeps its visibility).
        commit_message: The commit message.
    """
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    # delete_patterns="*": in the same commit, remove remote files the staging folder does not have (.gitattributes
    # excepted), so the repo mirrors it and a stale file from an earlier upload (an old shard index) cannot shadow
    # the new weights.
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=staging,
        commit_message=commit_message,
        ignore_patterns=[STAGING_MARKER],
        delete_patterns="*",
    )
    return commit.commit_url


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_options(PushOptions, argv=argv, description=__doc__)
    run_dir = args.model
    # resolve(): `--model .` or `--model runs/demo/` must still name the staging folder after the run.
    out = args.out if args.out is not None else run_dir.resolve().parent / f"{run_dir.resolve().name}-upload"
    find_model_dir(run_dir)  # a folder without a model fails before the offline check and the staging
    if not args.dry_run and hub_constants.HF_HUB_OFFLINE:
        raise ValueError("HF_HUB_OFFLINE is set (the Makefile exports it): unset it to upload, or pass --dry-run")

    staging = stage(run_dir, args.repo_id, out, license=args.license)
    files = sorted(p for p in staging.iterdir() if p.name != STAGING_MARKER)
    print(f"staged {len(files)} files in {staging}:")
    for path in files:
        print(f"  {path.name:32s} {path.stat().st_size:>12,} bytes")
    if args.dry_run:
        print(f"dry run: nothing uploaded. Read {staging / 'README.md'}, then run again without --dry-run.")
        return staging

    url = upload(
        staging, args.repo_id, args.private, args.commit_message or f"Upload {run_dir.resolve().name} with tiny-hf"
    )
    print(f"uploaded to https://huggingface.co/{args.repo_id} ({url})")
    return staging


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
