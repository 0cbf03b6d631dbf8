"""Model cards: the README.md with YAML metadata (`library_name`, `base_model`, `datasets`, `tags`, `pipeline_tag`,
`model-index`) that every stage writes into the model folder it saves, and that `tiny-hf push` uploads.

A card is built only from files in the run folder, so it can be rebuilt at any time (`tiny-hf eval` rebuilds it
with its results): `run_config.json` (the stage, its options and the run it started from), `metrics.jsonl` (a
pretraining run's validation), `summary.md` (a later stage's before/after table), `eval/results.json` (the
harness). Local paths never reach the card: local data and base models show by name, Hub ids stay whole.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from tiny_hf.runs import resolve_model
from training import report
from training.run_log import find_pretraining_run, read_run_config, write_run_config

CARD_FILE = "README.md"
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)*[\w.+-]+")  # /tmp/x/prefs.jsonl, not a URL's or a/b's path
EVAL_RESULTS = Path("eval") / "results.json"  # written by `tiny-hf eval` (alignment/harness.py)
# What each stage made, for the card's first line.
STAGE_SENTENCES = {
    "pretrain": "pretrained from scratch with tiny-hf (`tiny-hf pretrain`)",
    "sft": "fine-tuned on chat data with TRL's SFTTrainer (`tiny-hf sft`)",
    "dpo": "aligned with direct preference optimisation, TRL's DPOTrainer (`tiny-hf dpo`)",
    "grpo": "trained with GRPO on verifiable rewards, TRL's GRPOTrainer (`tiny-hf grpo`)",
    "rloo": "trained with RLOO on verifiable rewards, TRL's RLOOTrainer (`tiny-hf grpo --algo rloo`)",
    "ppo": "trained with tiny-hf's own PPO (`tiny-hf ppo`)",
    "reward": "a reward model (a scalar head scoring a conversation) trained on preference pairs, TRL's "
    "RewardTrainer (`tiny-hf reward`)",
    "lora": "fine-tuned with LoRA through PEFT (`tiny-hf lora`)",
    "prune": "pruned structurally (heads and neurons) and recovered (`tiny-hf prune`)",
    "fetch": "a pretrained Hub model rebuilt as a standard folder (`tiny-hf fetch`)",
}
STAGE_TAGS = {
    "sft": ["trl", "sft"],
    "dpo": ["trl", "dpo"],
    "grpo": ["trl", "grpo"],
    "rloo": ["trl", "rloo"],
    "ppo": ["ppo", "rlhf"],
    "reward": ["trl", "reward-model"],
    "lora": ["peft", "lora"],
}
# run_config.json fields shown in the card's Training table, in reading order (a pretraining run's; a later stage's
# own options come first). Not `tokenizer` (a local path) nor `vocab_size` (the Model table has the real one).
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
TRAINER_KEYS = ("max_steps", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "beta", "seed")
LIMITATIONS = [
    "",
    "## Limitations",
    "",
    "A small model trained on a small corpus, for learning and experiments: it writes text that looks fluent "
    "and is often wrong. Do not use it for anything that matters.",
]


# --- names that may appear in public metadata ----------------------------------------------------------------------
def hub_id(name: str | None) -> str | None:
    """`name` if it is a Hub id (owner/name, not a local path), else None: metadata names only what the Hub has."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def public_name(name: str) -> str:
    """A Hub id as it is; a local path by its last part ('runs/demo' -> 'demo')."""
    return name if hub_id(name) else (Path(name).name or name)


def card_title(name: str) -> str:
    """The model's name in the card: 'you/tiny-sft' -> 'tiny-sft', 'runs/sft/model' -> 'sft'."""
    path = Path(name)
    return (path.parent.name if path.name in ("model", "merged", "adapter") else path.name) or name


def local_name(run_dir: Path, model_dir: Path) -> str:
    """How a local card names its model: the path as the stage was given it, or its last parts if absolute."""
    if not model_dir.is_absolute():
        return str(model_dir)
    return str(Path(run_dir.name, model_dir.name)) if model_dir != run_dir else model_dir.name


def scrub_paths(text: str) -> str:
    """`text` with every absolute path shown by its last part: a card is public, the machine's folders are not."""
    return ABSOLUTE_PATH.sub(lambda match: Path(match.group(0)).name or match.group(0), text)


def public_data_spec(spec: str) -> str:
    """A data spec without local directories: '/home/me/notes/:0.3,embedded:0.7' -> 'notes:0.3,embedded:0.7'.

    As in training/data.py, only a last ':' followed by a number is a weight; Hub names and URLs stay whole.
    """
    parts = []
    for part in str(spec).split(","):
        source, weight = part.strip(), ""
        head, _, tail = source.rpartition(":")
        try:
            float(tail)
            source, weight = head, f":{tail}"
        except ValueError:
            pass  # no weight: the ':' (if any) belongs to the name
        if Path(source).is_absolute() or Path(source).expanduser().exists():
            source = Path(source).name or source
        parts.append(source + weight)
    return ",".join(parts)


def hub_datasets(spec: str | None) -> list[str]:
    """The Hub datasets a data spec names ('embedded' and local files are not on the Hub)."""
    names = [part.strip().split(":")[0] for part in str(spec or "").split(",")]
    return [name for name in names if hub_id(name)]


# --- what the run folder holds -------------------------------------------------------------------------------------
def parameter_count(model_dir: Path) -> int | None:
    """Parameters stored in the folder's safetensors files (tied weights once), without loading the model."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    return total or None


def harness_results(run_dir: Path) -> dict | None:
    """`tiny-hf eval`'s results.json of the run, if it was evaluated."""
    path = run_dir / EVAL_RESULTS
    return json.loads(path.read_text()) if path.is_file() else None


def eval_results(records: list[dict], harness: dict | None) -> list[EvalResult]:
    """The card's model-index: the harness's metrics per task, and a pretraining run's held-out validation."""
    results = []
    for task, metrics in (harness or {}).get("tasks", {}).items():
        for metric, value in metrics.items():
            if metric == "n" or metric.endswith("_stderr") or value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=f"{task} (tiny-hf eval, n={metrics.get('n')})",
                    metric_type=metric,
                    metric_value=round(float(value), 6),
                )
            )
    validation = report.run_results(records) if records else {}
    for key in ("val_loss", "val_bits_per_byte"):
        if key in validation:
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type="held-out",
                    dataset_name="held-out documents of the pretraining corpus",
                    metric_type=key.removeprefix("val_"),
                    metric_value=round(float(validation[key]), 6),
                )
            )
    return results


def model_kind(model_dir: Path) -> str:
    """'adapter' (a PEFT adapter folder), 'classifier' (a reward model) or 'causal-lm'."""
    if (model_dir / "adapter_config.json").is_file():
        return "adapter"
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or [""]
    return "classifier" if architectures[0].endswith("ForSequenceClassification") else "causal-lm"


def is_remote_code(model_dir: Path) -> bool:
    """Whether the folder's model is tiny_hf's (it loads with trust_remote_code=True from its own source files)."""
    config = model_dir / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "tiny"


# --- the sections --------------------------------------------------------------------------------------------------
def human_count(n: int) -> str:
    """1_234_567 -> '1.2M', 34_560 -> '34.6K'."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown_table(rows: list[tuple[str, object]], header: tuple[str, str]) -> list[str]:
    """The lines of a two-column markdown table; values formatted as report.py does."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {key} | {report.format_value(value)} |" for key, value in rows]


def usage_code(name: str, kind: str, remote: bool) -> list[str]:
    """How to load and run the folder: a causal LM generates, a reward model scores, an adapter loads on its base."""
    trust = ", trust_remote_code=True" if remote else ""
    if kind == "adapter":
        return [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{name}"{trust})',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{trust})',
        ]
    loader = "AutoModelForSequenceClassification" if kind == "classifier" else "AutoModelForCausalLM"
    lines = [
        f"from transformers import {loader}, AutoTokenizer",
        "",
        f'model = {loader}.from_pretrained("{name}"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"{trust})',
    ]
    if kind == "classifier":
        return lines + [
            'chat = [{"role": "user", "content": "What does `json.dumps` do?"}, {"role": "assistant", "content": '
            '"Serialize obj to a JSON formatted str."}]',
            "ids = tokenizer.apply_chat_template(chat, return_tensors='pt', return_dict=True)",
            "print(model(**ids).logits[0, 0].item())  # higher: a better answer",
        ]
    return lines + [
        'inputs = tokenizer("The json module", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_p=0.9)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
    ]


def usage_section(name: str, model_dir: Path, stage: str, base: str | None) -> list[str]:
    """What the model is, where it came from and how to load it (with the remote-code warning where it applies)."""
    kind, remote = model_kind(model_dir), is_remote_code(model_dir)
    parameters = parameter_count(model_dir)
    size = f"{human_count(parameters)}-parameter " if parameters else ""
    what = {"adapter": "LoRA adapter", "classifier": "sequence-classification model"}.get(
        kind, "decoder-only language model"
    )
    title = card_title(name)
    body = [
        f"# {title}",
        "",
        f"A {size}{what}, {STAGE_SENTENCES.get(stage, f'made by tiny-hf {stage}')}",
    ]
    body[-1] += f", starting from `{public_name(base)}`." if base else "."
    if remote:
        body[-1] += (
            " Its code ships beside the weights (`configuration_tiny.py`, `modeling_tiny.py`, `tokenization_tiny.py`),"
            " so it loads with `trust_remote_code=True` and needs only `transformers` and `torch`."
        )
    body += ["", "## Usage", "", "```python", *usage_code(name, kind, remote), "```"]
    if remote:
        body += [
            "",
            "`trust_remote_code=True` runs this repository's Python files on your machine: read them first, and pass "
            "`revision=` (a commit hash) so that what you read is what runs.",
        ]
    return body


def evaluation_section(results: dict, harness: dict | None, images: list[str]) -> list[str]:
    """The harness's table (`tiny-hf eval`), a pretraining run's final validation figures, and the run's plots."""
    body = ["", "## Evaluation", ""]
    if harness:
        body += [
            line.replace("# Standard evaluation", "### lm-evaluation-harness", 1)
            for line in harness_markdown(harness).splitlines()
        ]
        body.append("")
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
    if not harness and "val_loss" not in results:
        body.append("No evaluation was recorded for this run (`tiny-hf eval --model RUN` adds one).")
    return body + [f"\n![{Path(image).stem.replace('_', ' ')}]({image})" for image in images]


def harness_markdown(harness: dict) -> str:
    """The harness table as `tiny-hf eval` wrote it (results.md), with local paths by name only."""
    from tiny_hf.results import markdown_cell

    lines = [f"# Standard evaluation: {public_name(harness['model'])}", ""]
    run = f"held-out documents of `{public_name(harness['run'])}`" if harness.get("run") else "no documents"
    lines += [
        f"lm-evaluation-harness {harness['lm_eval_version']}, window {harness['window']} tokens; {run}.",
        "",
        "| task | n | metric | value | ± stderr |",
        "|---|---:|---|---:|---:|",
    ]
    for task, metrics in harness["tasks"].items():
        for name, value in metrics.items():
            if name == "n" or name.endswith("_stderr") or value is None:
                continue
            stderr = metrics.get(f"{name}_stderr")
            cell = f"{stderr:.4f}" if isinstance(stderr, float) else ""
            lines.append(f"| {markdown_cell(task)} | {metrics['n']} | {name} | {value:.4f} | {cell} |")
    if "ours" in harness:
        bits = harness["ours"]["bits_per_byte"]
        lines += ["", f"training/evaluation.py on the same documents: {bits:.4f} bits per byte."]
    return "\n".join(lines) + "\n"


def stage_section(run_dir: Path) -> list[str]:
    """A later stage's own before/after table (its summary.md), one heading level down."""
    path = run_dir / "summary.md"
    if not path.is_file() or (run_dir / report.METRICS_FILE).is_file():
        return []  # a pretraining run's summary.md repeats the Evaluation and Model sections
    lines = path.read_text().splitlines()
    title = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else "This stage"
    return ["", f"## {title}", *[("#" + line if line.startswith("#") else line) for line in lines[1:]]]


def model_section(model_dir: Path) -> list[str]:
    """The architecture: the config fields the run summary shows, the parameter count and the dtype."""
    if not (model_dir / "config.json").is_file():
        return []
    config = json.loads((model_dir / "config.json").read_text())
    rows = [
        ("architectures", ", ".join(config.get("architectures") or [])),
        ("parameters", parameter_count(model_dir)),
    ]
    rows += [(k, config[k]) for k in report.SUMMARY_CONFIG_KEYS if k in config]
    rows.append(("dtype", config.get("dtype") or config.get("torch_dtype")))
    return ["", "## Model", ""] + markdown_table([(k, v) for k, v in rows if v is not None], ("field", "value"))


def training_section(run_config: dict | None, results: dict) -> list[str]:
    """The training setup from run_config.json: the stage's options, a trainer's main fields, local paths removed."""
    body = ["", "## Training", ""]
    if not run_config:
        return body + ["The run folder had no run_config.json, so the training setup is not recorded here."]
    keys = TRAINING_KEYS if run_config.get("stage", "pretrain") == "pretrain" else ("data", "lora", *TRAINING_KEYS)
    rows = [
        (k, f"`{public_data_spec(v)}`" if k == "data" else v) for k in keys if (v := run_config.get(k)) is not None
    ]
    trainer = run_config.get("trainer") or {}
    rows += [(k, trainer[k]) for k in TRAINER_KEYS if trainer.get(k) is not None and k not in run_config]
    if "tokens" in results:
        rows.append(("tokens seen", results["tokens"]))
    if "skipped_steps" in results:
        rows.append(("skipped steps (loss spikes)", results["skipped_steps"]))
    body += markdown_table(rows, ("setting", "value"))
    if "embedded" in str(run_config.get("data", "")):
        body += [
            "",
            "`embedded` is tiny-hf's built-in corpus: the English documentation of the Python it ran on (pydoc "
            "topics and standard-library docstrings), about 2.5 MB.",
        ]
    return body


# --- the card ------------------------------------------------------------------------------------------------------
def card_metadata(model_dir: Path, run_config: dict | None, evals: list[EvalResult], name: str, license: str):
    """The YAML block: license, library, base model and datasets where the Hub has them, tags, pipeline, results."""
    run_config = run_config or {}
    stage = run_config.get("stage", "pretrain")
    kind = model_kind(model_dir)
    tags = ["tiny-hf", stage, *STAGE_TAGS.get(stage, [])]
    tags += ["custom_code"] if is_remote_code(model_dir) else []
    base = run_config.get("base_model")
    if kind == "adapter":
        base = base or json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return ModelCardData(
        license=license,
        library_name="peft" if kind == "adapter" else "transformers",
        base_model=hub_id(base),
        datasets=hub_datasets(run_config.get("data")) or None,
        tags=list(dict.fromkeys(tags if kind == "classifier" else [*tags, "text-generation"])),
        pipeline_tag="text-classification" if kind == "classifier" else "text-generation",
        model_name=card_title(name),
        eval_results=evals or None,
    )


def build_model_card(run_dir: Path, model_dir: Path, repo_id: str | None = None, license: str = "apache-2.0"):
    """The model card of `model_dir` from the files of `run_dir` (see the module docstring).

    Args:
        run_dir: The stage's output folder (a pretraining run folder, runs/sft, ...), or the model folder itself.
        model_dir: The model folder the card describes.
        repo_id: `owner/name` for the usage snippet (default: the model folder's path, as it loads locally).
        license: A Hub license id.
    """
    run_config = read_run_config(run_dir)
    records = report.read_metrics(run_dir) if (run_dir / report.METRICS_FILE).is_file() else []
    results = report.run_results(records) if records else {}
    harness = harness_results(run_dir)
    name = repo_id or local_name(run_dir, model_dir)
    evals = eval_results(records, harness)
    images = sorted(p.name for p in run_dir.glob("*.png")) if repo_id else []  # push copies the plots beside it
    base = (run_config or {}).get("base_model")
    body = (
        usage_section(name, model_dir, (run_config or {}).get("stage", "pretrain"), base)
        + evaluation_section(results, harness, images)
        + stage_section(run_dir)
        + model_section(model_dir)
        + training_section(run_config, results)
        + LIMITATIONS
    )
    data = card_metadata(model_dir, run_config, evals, name, license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + scrub_paths("\n".join(body)) + "\n")


def write_model_card(run_dir: Path, model_dir: Path | None = None) -> Path:
    """Write `<model_dir>/README.md` (default `<run_dir>/model`) from the run folder's files; returns its path."""
    model_dir = Path(model_dir or Path(run_dir) / "model")
    path = model_dir / CARD_FILE
    build_model_card(Path(run_dir), model_dir).save(path)
    return path


def stage_facts(stage: str, options, trainer_config=None) -> dict:
    """What run_config.json records of a stage besides its options: the stage, the base model it started from, the
    pretraining run behind that model (whose held-out documents `tiny-hf eval` uses) and the trainer's config."""
    base = getattr(options, "model", None)
    base_run = None
    if base is not None and Path(str(base)).exists():
        base_run = find_pretraining_run(resolve_model(str(base))[1])
    facts = {"stage": stage, "base_model": str(base) if base is not None else None, "base_run": base_run}
    if trainer_config is not None:
        facts["trainer"] = trainer_config.to_dict()
    return facts


def record_stage(out: Path, stage: str, options, trainer_config=None, model_dirs: tuple[str, ...] = ("model",)):
    """What every stage leaves beside its model: `run_config.json` (its options and `stage_facts`) and a model
    card in each of `model_dirs` that holds a model."""
    write_run_config(out, options, **stage_facts(stage, options, trainer_config))
    for name in model_dirs:
        if (Path(out) / name / "config.json").is_file() or (Path(out) / name / "adapter_config.json").is_file():
            write_model_card(Path(out), Path(out) / name)
