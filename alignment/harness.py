"""Standard evaluation with EleutherAI's lm-evaluation-harness: `tiny-hf eval`, on a run folder or a Hub id.

    tiny-hf eval --model runs/demo                       # the project's three tasks -> runs/demo/eval/
    tiny-hf eval --model runs/sft                        # an SFT run: the documents of the run it started from
    tiny-hf eval --model runs/demo --tasks tiny_bits_per_byte,my_task.yaml,hellaswag   # any harness task too

The harness loads the model as it loads any Hub model (its `hf` model, `trust_remote_code=True`, float32) and runs
the tasks the project ships as YAML in alignment/eval_tasks/, on data written for this model into `<out>/data/`:
- `tiny_bits_per_byte`: the pretraining run's held-out documents, each scored whole (`loglikelihood_rolling`,
  windows of the run's block size). `ours` beside it is training/evaluation.py's `document_bits_per_byte` on the
  same documents: the two agree, which ties the harness to the figure every stage reports.
- `tiny_continuation`: multiple choice built from those documents (which 6-word span continues a 20-word passage;
  chance 25%), accuracy and length-normalised accuracy.
- `tiny_verifiable`: the verifiable task's held-out questions (alignment/data.py) in the model's chat template,
  greedy, exact match of the first name or number.
A task file (`.yaml`) or a harness task name (`hellaswag`, with its data in the local cache) runs as given. Results
go to `<out>/results.json` and `results.md` (default `<run>/eval`), which the model card's `model-index` and the
report card read; the run's model card is rewritten with them.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import yaml

from tiny_hf.results import write_results
from tiny_hf.runs import model_path, resolve_model
from training.model_card import harness_markdown, public_name, write_model_card
from training.run_log import find_pretraining_run, read_run_config

TASKS_DIR = Path(__file__).with_name("eval_tasks")
PROJECT_TASKS = ("tiny_bits_per_byte", "tiny_continuation", "tiny_verifiable")
RESULTS_FILE = "results.json"
EVAL_DIR = "eval"  # inside a run folder
CONTEXT_WORDS, CHOICE_WORDS, CHOICES = 20, 6, 4


@dataclass
class HarnessOptions:
    model: str = field(default="runs/demo", metadata={"help": "a run folder, a model folder or a Hub id"})
    run: str | None = field(
        default=None, metadata={"help": "the pretraining run whose held-out documents to use (default: found)"}
    )
    tasks: str = field(
        default=",".join(PROJECT_TASKS),
        metadata={"help": "comma-separated: the project's tasks, task .yaml files, or any harness task name"},
    )
    limit: int = field(default=1000, metadata={"help": "examples (documents, questions) per project task (0: all)"})
    batch_size: int = field(default=16)
    device: str = field(default="cpu")
    out: Path | None = field(default=None, metadata={"help": "results folder (default: <run folder>/eval)"})
    results: Path | None = field(
        default=None, metadata={"help": "also write eval_<run>.md/.json here (bench/results)"}
    )
    stdlib_dir: str | None = field(
        default=None, metadata={"help": "the verifiable task's source (default: this Python)"}
    )


# --- the project's task data ---------------------------------------------------------------------------------------
def continuation_rows(texts: list[str], limit: int, seed: int = 0) -> list[dict]:
    """Multiple-choice rows {context, choices, label}: a passage of CONTEXT_WORDS words, its next CHOICE_WORDS words
    and CHOICES - 1 spans of the same length from other passages, in a seeded order."""
    passages = []
    for text in texts:
        words = text.split()
        step = CONTEXT_WORDS + CHOICE_WORDS
        passages += [words[i : i + step] for i in range(0, len(words) - step + 1, step)]
    rng = random.Random(seed)
    rng.shuffle(passages)
    passages = passages[: limit or None]
    spans = [" ".join(p[CONTEXT_WORDS:]) for p in passages]
    rows = []
    for i, passage in enumerate(passages):
        others = [s for s in rng.sample(spans, min(len(spans), CHOICES + 2)) if s != spans[i]][: CHOICES - 1]
        if len(others) < CHOICES - 1:
            continue
        label = rng.randrange(CHOICES)
        choices = others[:label] + [spans[i]] + others[label:]
        rows.append({"context": " ".join(passage[:CONTEXT_WORDS]), "choices": choices, "label": label})
    return rows


def verifiable_rows(tokenizer, limit: int, stdlib_dir: str | None = None) -> list[dict]:
    """The verifiable task's held-out questions as {prompt, answer}: the prompt in the model's chat template."""
    from alignment.data import verifiable_dataset

    held_out = verifiable_dataset(stdlib_dir=stdlib_dir)["validation"]
    rows = []
    for row in held_out.select(range(min(limit or len(held_out), len(held_out)))):
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        else:
            prompt = f"Question: {row['prompt'][-1]['content']}\nAnswer:"
        rows.append({"prompt": prompt, "answer": row["answer"]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- tasks ---------------------------------------------------------------------------------------------------------
def read_task_file(path: Path) -> dict:
    """A harness task YAML file as a config mapping; one clear error when it does not parse or names no task."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"task file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ValueError(f"task file {path} must be a mapping with a 'task' name (an lm-evaluation-harness task)")
    return config


def project_task(name: str, data_file: Path) -> dict:
    """One of the shipped tasks, reading `data_file`."""
    config = read_task_file(TASKS_DIR / f"{name}.yaml")
    config["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    return config


def task_list(names: list[str], data: dict[str, Path]) -> list:
    """What `simple_evaluate` takes: project tasks and task files as config dicts, other names as they are."""
    tasks = []
    for name in names:
        if name in PROJECT_TASKS:
            tasks.append(project_task(name, data[name]))
        elif name.endswith((".yaml", ".yml")):
            if not Path(name).is_file():
                raise FileNotFoundError(f"--tasks: no task file {name}")
            tasks.append(read_task_file(Path(name)))
        else:
            tasks.append(name)
    return tasks


# --- running -------------------------------------------------------------------------------------------------------
def model_args(path: str, window: int, prefix_token_id: int) -> dict:
    """The harness's `hf` model arguments: remote code allowed, float32, the run's window, documents after eos."""
    return {
        "pretrained": path,
        "trust_remote_code": True,
        "dtype": "float32",
        "max_length": window,
        "prefix_token_id": prefix_token_id,
    }


def run_harness(path: str, tasks: list, window: int, prefix_token_id: int, options: HarnessOptions) -> dict:
    """`lm_eval.simple_evaluate` offline, with a private modules cache for the remote code."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    import lm_eval

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args(path, window, prefix_token_id),
        tasks=tasks,
        batch_size=options.batch_size,
        device=options.device,
        log_samples=False,
        bootstrap_iters=1000,
        verbosity="WARNING",
    )


def task_metrics(output: dict) -> dict[str, dict]:
    """{task: {metric: value}} from the harness output ("acc,none" -> "acc", "exact_match,first_answer" ->
    "exact_match"), with each task's n."""
    tasks = {}
    for task, values in output["results"].items():
        metrics = {
            key.split(",")[0]: value
            for key, value in values.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        metrics["n"] = output.get("n-samples", {}).get(task, {}).get("effective")
        tasks[task] = metrics
    return tasks


def output_folder(options: HarnessOptions, folders: list[Path]) -> Path:
    """--out, else `<run>/eval` for a local run or model folder, else runs/eval/<owner--name> for a Hub id."""
    if options.out is not None:
        return options.out
    return folders[0] / EVAL_DIR if folders else Path("runs/eval") / options.model.replace("/", "--")


def task_data(names: list[str], run_dir: Path | None, tokenizer, options: HarnessOptions, out: Path):
    """Write the data files of the project tasks in `names` into `<out>/data`; returns them and the documents."""
    from training.evaluation import validation_documents

    needs_documents = {"tiny_bits_per_byte", "tiny_continuation"} & set(names)
    if needs_documents and run_dir is None:
        raise ValueError(
            f"--model {options.model} has no pretraining run to take held-out documents from: pass --run RUN (a "
            f"folder tiny-hf pretrain wrote), or --tasks tiny_verifiable"
        )
    texts = validation_documents(run_dir)[: options.limit or None] if needs_documents else []
    rows = {
        "tiny_bits_per_byte": lambda: [{"text": text} for text in texts],
        "tiny_continuation": lambda: continuation_rows(texts, options.limit),
        "tiny_verifiable": lambda: verifiable_rows(tokenizer, options.limit, options.stdlib_dir),
    }
    files = {name: write_jsonl(out / "data" / f"{name}.jsonl", rows[name]()) for name in names if name in rows}
    return files, texts


def main(argv: list[str] | None = None) -> dict:
    from tiny_hf.options import parse_options

    (options,) = parse_options(HarnessOptions, argv=argv, description=__doc__)
    names = [name.strip() for name in options.tasks.split(",") if name.strip()]
    if not names:
        raise ValueError(
            f"--tasks is empty: name some of {', '.join(PROJECT_TASKS)}, task .yaml files or harness tasks"
        )
    task_list(names, {name: Path(name) for name in PROJECT_TASKS})  # task files parse before any model loads
    if options.run is not None and find_pretraining_run([Path(options.run)]) is None:
        raise ValueError(
            f"--run {options.run}: not a pretraining run folder (no run_config.json from tiny-hf pretrain)"
        )
    model_path("--model", options.model)  # a folder without a model, or an unknown Hub id: one line naming --model
    path, folders = resolve_model(options.model)
    run_dir = Path(options.run) if options.run else find_pretraining_run(folders)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tiny_hf  # noqa: F401 (registers the Auto classes)
    from training.evaluation import document_bits_per_byte

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    run_config = read_run_config(run_dir) if run_dir else {}
    window = run_config.get("block_size") or model.config.max_position_embeddings
    out = output_folder(options, folders)
    data, texts = task_data(names, run_dir, tokenizer, options, out)

    output = run_harness(path, task_list(names, data), window, tokenizer.eos_token_id, options)
    results = {
        "model": options.model,
        "run": str(run_dir) if run_dir else None,
        "window": window,
        "lm_eval_version": version("lm_eval"),
        "tasks": task_metrics(output),
    }
    if "tiny_bits_per_byte" in names:
        ours = document_bits_per_byte(model.to(options.device), tokenizer, texts, window, tokenizer.eos_token_id)
        results["ours"] = {"bits_per_byte": ours}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(harness_markdown(results))
    if folders and options.out is None:
        write_model_card(folders[0], Path(path))  # the card's model-index now holds these results
    if options.results is not None:
        write_results(f"eval_{public_name(options.model)}", results, harness_markdown(results), options.results)
    print(harness_markdown(results))
    return results


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
