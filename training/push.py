"""Upload a run to the Hugging Face Hub as a model that loads without tiny_hf.

    tiny-hf push --model runs/demo --repo-id you/tiny-demo --dry-run   # build runs/demo-upload, stop
    tiny-hf push --model runs/demo --repo-id you/tiny-demo             # build it, then upload it

The staging folder (`--out`, default `<run>-upload` beside the run) holds exactly what is uploaded:
- the model re-exported with `tiny_hf.export`: weights, a config whose `auto_map` names every Auto class, the
  tokenizer and tiny_hf's model source files, so `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`
  works for people who do not have tiny_hf (a run saved with plain `save_pretrained` gets them too);
- the run's plots (*.png), metrics.jsonl and summary.md;
- README.md, the model card: metadata, usage, validation metrics, architecture, training setup.
The rest of the run folder (checkpoints, TensorBoard logs, run_config.json with its local paths) stays home.
The upload is one commit that makes the repo mirror the staging folder: remote files it lacks are deleted.

Uploading needs a token (`hf auth login`, or HF_TOKEN) and HF_HUB_OFFLINE unset; the Makefile exports
HF_HUB_OFFLINE=1, so run this outside make.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import tiny_hf  # registers model_type "tiny" with the Auto classes
from tiny_hf.options import parse_options
from training import report

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
CARD_TAGS = ["tiny-hf", "text-generation", "custom_code"]
USAGE_PROMPT = "The json module"
# run_config.json (pretrain.py's arguments) fields shown in the card, in reading order.
# Not `tokenizer` (a local path) nor `vocab_size` (used only when a tokenizer is trained; the Model table has the real
# one); `data` goes through public_data_spec.
TRAINING_KEYS = (
    "data",
    "block_size",
    "seq_len_schedule",
    "max_steps",
    "batch_size",
    "grad_accum",
    "world_size",
    "lr",
    "schedule",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "z_loss",
    "mixed_precision",
    "seed",
)


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
    """The model folder of a run (`run/model/`), or `run_dir` itself if it is a model folder."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--model {run_dir}: no such run folder")
    for candidate in (run_dir / "model", run_dir):
        if (candidate / "config.json").is_file() and any((candidate / f).is_file() for f in WEIGHT_FILES):
            model_type = json.loads((candidate / "config.json").read_text()).get("model_type")
            if model_type != tiny_hf.TinyConfig.model_type:
                raise ValueError(
                    f"{candidate} holds a {model_type!r} model; push.py exports tiny_hf models "
                    f"(model_type {tiny_hf.TinyConfig.model_type!r})"
                )
            return candidate
    raise FileNotFoundError(
        f"no model in {run_dir}: expected config.json and one of {WEIGHT_FILES} in {run_dir / 'model'} or {run_dir}"
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


# --- the model card ------------------------------------------------------------------------------------------------
def human_count(n: int) -> str:
    """1_234_567 -> '1.2M', 34_560 -> '34.6K'."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def public_data_spec(spec: str) -> str:
    """A data spec without local directories: '/home/me/notes/:0.3,embedded:0.7' -> 'notes:0.3,embedded:0.7'.

    The card is public: a local file or folder shows by its name only; Hub names ('user/name:config') and URLs
    stay whole. As in training/data.py, only a last ':' followed by a number is a weight.
    """
    parts = []
    for part in str(spec).split(","):
        source, weight = part.strip(), ""
        head, sep, tail = source.rpartition(":")
        try:
            float(tail)
            source, weight = head, f":{tail}"
        except ValueError:
            pass  # no weight: the ':' (if any) belongs to the name
        if Path(source).is_absolute() or Path(source).expanduser().exists():
            source = Path(source).name or source
        parts.append(source + weight)
    return ",".join(parts)


def markdown_table(rows: list[tuple[str, object]], header: tuple[str, str]) -> list[str]:
    """The lines of a two-column markdown table; values formatted as report.py does."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {key} | {report.format_value(value)} |" for key, value in rows]


def usage_section(repo_id: str, parameters: int) -> list[str]:
    """What the model is and how to load it (with the remote-code warning)."""
    return [
        f"# {repo_id.split('/')[1]}",
        "",
        f"A {human_count(parameters)}-parameter decoder-only language model built and trained from scratch with "
        "tiny-hf. Its code ships in this repository (`configuration_tiny.py`, `modeling_tiny.py`, "
        "`tokenization_tiny.py`), so it loads with `trust_remote_code=True` and needs only `transformers` and "
        "`torch`.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'inputs = tokenizer("{USAGE_PROMPT}", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_p=0.9)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
        "",
        "`trust_remote_code=True` runs this repository's Python files on your machine: read them first, and pass "
        "`revision=` (a commit hash) so that what you read is what runs.",
    ]


def evaluation_section(results: dict, images: list[str]) -> list[str]:
    """The final validation figures of the run (if it recorded any) and its plots."""
    body = ["", "## Evaluation", ""]
    if "val_loss" in results:
        rows = [
            ("validation loss (nats per token)", f"{results['val_loss']:.4f}"),
            ("validation perplexity", f"{results['val_perplexity']:.2f}" if "val_perplexity" in results else None),
            (
                "validation bits per byte",
                f"{results['val_bits_per_byte']:.4f}" if "val_bits_per_byte" in results else None,
            ),
            ("at step", results.get("val_step")),
            ("tokens seen", results.get("tokens")),
        ]
        body += markdown_table([(k, v) for k, v in rows if v is not None], ("metric", "value"))
        body += [
            "",
            "On a held-out split of the training corpus, at the end of training. Bits per byte (total nats / ln 2 / "
            "UTF-8 bytes) does not depend on the tokenizer, so it compares models with different vocabularies; "
            "loss and perplexity are per token and do not.",
        ]
    else:
        body.append("No evaluation was recorded for this run.")
    return body + [f"\n![{Path(image).stem.replace('_', ' ')}]({image})" for image in images]


def model_section(model: PreTrainedModel) -> list[str]:
    """The architecture: the config fields the run summary shows, the parameter count and the dtype."""
    config = model.config.to_dict()
    architecture = [
        ("architectures", ", ".join(config.get("architectures") or [])),
        ("parameters", model.num_parameters()),
    ]
    architecture += [(k, config[k]) for k in report.SUMMARY_CONFIG_KEYS if k in config]
    architecture.append(("dtype", str(model.dtype).removeprefix("torch.")))
    return ["", "## Model", ""] + markdown_table(architecture, ("field", "value"))


def training_section(run_config: dict | None, results: dict) -> list[str]:
    """The training setup from run_config.json (local paths removed from the data spec)."""
    body = ["", "## Training", ""]
    if not run_config:
        return body + ["The run folder had no run_config.json, so the training setup is not recorded here."]
    training = [
        (k, f"`{public_data_spec(v)}`" if k == "data" else v)
        for k in TRAINING_KEYS
        if (v := run_config.get(k)) is not None
    ]
    if "tokens" in results:
        training.append(("tokens seen", results["tokens"]))
    if "skipped_steps" in results:
        training.append(("skipped steps (loss spikes)", results["skipped_steps"]))
    body += markdown_table(training, ("setting", "value"))
    if "embedded" in str(run_config.get("data", "")):
        body += [
            "",
            "`embedded` is tiny-hf's built-in corpus: the English documentation of the Python it ran on (pydoc "
            "topics and standard-library docstrings), about 2.5 MB.",
        ]
    return body


LIMITATIONS = [
    "",
    "## Limitations",
    "",
    "A small model trained on a small corpus, for learning and experiments: it writes text that looks fluent "
    "and is often wrong. Do not use it for anything that matters.",
]


def build_model_card(
    repo_id: str,
    model: PreTrainedModel,
    records: list[dict],
    run_config: dict | None,
    images: list[str],
    license: str = "apache-2.0",
) -> ModelCard:
    """The README.md of the Hub repo: YAML metadata (license, library, tags, pipeline) and a readable body.

    Args:
        repo_id: `owner/name`, used in the usage snippet.
        model: The model being uploaded (its config and parameter count go into the card).
        records: The run's metrics.jsonl records (may be empty).
        run_config: pretrain.py's arguments from run_config.json, or None.
        images: File names of the plots copied into the repo.
        license: A Hub license id.
    """
    data = ModelCardData(
        license=license, library_name="transformers", tags=list(CARD_TAGS), pipeline_tag="text-generation"
    )
    results = report.run_results(records) if records else {}
    body = (
        usage_section(repo_id, model.num_parameters())
        + evaluation_section(results, images)
        + model_section(model)
        + training_section(run_config, results)
        + LIMITATIONS
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


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
    tokenizer_dir = find_tokenizer_dir(run_dir, model_dir)
    check_staging_dir(out)
    # trust_remote_code=False: use the installed tiny_hf classes (whose source export copies), even where the
    # folder's config carries an auto_map from an earlier export.
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    records = report.read_metrics(run_dir) if (run_dir / report.METRICS_FILE).is_file() else []
    run_config_path = run_dir / "run_config.json"
    run_config = json.loads(run_config_path.read_text()) if run_config_path.is_file() else None

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / STAGING_MARKER).write_text("built by training/push.py; replaced on the next run, never uploaded\n")
    tiny_hf.export(model, tokenizer, out)
    images = sorted(p.name for p in run_dir.glob("*.png"))
    for name in images + [f for f in RUN_FILES if (run_dir / f).is_file()]:
        shutil.copyfile(run_dir / name, out / name)
    card = build_model_card(repo_id, model, records, run_config, images, license=license)
    card.save(out / "README.md")
    return out


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
