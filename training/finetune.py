"""LoRA and QLoRA fine-tuning with PEFT: `tiny-hf lora --model runs/demo --out runs/lora`.

LoRA (Hu et al. 2021) freezes the pretrained weights and trains a low-rank update B A beside chosen linear layers;
QLoRA (Dettmers et al. 2023) does the same over a base quantized to 4-bit NF4 with bitsandbytes. What happens:
1. Model: --model is a pretraining run folder (model/ + run_config.json), a model folder or a Hub id: our models or
   any causal LM (--task causal-lm) or sequence classifier (--task seq-cls) that transformers loads. --qlora loads
   it in 4-bit NF4 with float32 compute and runs `prepare_model_for_kbit_training`.
2. LoRA: PEFT's `LoraConfig` fields by their own names (--r, --lora-alpha, --lora-dropout, --target-modules);
   --target-modules auto picks the layers per architecture (TARGET_MODULES, keyed by `config.model_type`;
   otherwise every linear layer but the head); a classification head is trained in full (`modules_to_save`).
3. Data: causal LM: packed blocks from training/data.py (a run folder's own data, block size and split unless
   --data/--block-size say otherwise); seq-cls: 'sentiment' (short synthetic reviews built here, deterministic) or
   a .jsonl/.csv file with "text" and "label" columns.
4. Training: transformers' Trainer; every `TrainingArguments` field is an option (--learning-rate,
   --per-device-train-batch-size, --max-steps, --use-cpu, ...; TRAINER_DEFAULTS holds where ours differ). Before and
   after it: validation loss, perplexity and bits per byte (training/evaluation.py, the run's own validation blocks
   for a run folder), or accuracy for seq-cls. Logs: `--report-to` (training/trackers.py), TensorBoard in `<out>/tb`
   by default, or trackio, wandb, none.
5. Output in --out: adapter/ (reloaded with `PeftModel.from_pretrained` to check it gives the same logits),
   merged/ with --merge (`merge_and_unload` into a full-precision base: a plain model folder), summary.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

import tiny_hf  # registers the Auto classes
from tiny_hf.corpus import stable_fraction
from tiny_hf.lora import find_linear
from tiny_hf.options import parse_options
from tiny_hf.quantization import bnb_cpu_blocks
from tiny_hf.runs import resolve_model
from training.data import build_datasets, token_byte_lengths
from training.evaluation import evaluate_lm, validation_set
from training.model_card import record_stage
from training.run_log import find_pretraining_run
from training.trackers import PROJECT, place_trainer_reports, trainer_tensorboard_dir

TASKS = {
    "causal-lm": (AutoModelForCausalLM, TaskType.CAUSAL_LM),
    "seq-cls": (AutoModelForSequenceClassification, TaskType.SEQ_CLS),
}
_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # attention + MLP
# What `--target-modules auto` adapts, by config.model_type: every projection of attention and MLP (QLoRA's finding:
# adapting all layers matters more than the rank). Other architectures get every linear layer but the head.
TARGET_MODULES = {
    "tiny": _DECODER,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
}
HEADS = ("lm_head", "score", "classifier", "pre_classifier")  # output layers: never LoRA targets
# PEFT trains `score`/`classifier` of a seq-cls model in full by itself; DistilBERT's new pre_classifier needs naming.
EXTRA_HEADS = ("pre_classifier",)
LINEAR_TYPES = (torch.nn.Linear, Conv1D)  # GPT-2 uses Conv1D; bitsandbytes' Linear4bit is an nn.Linear
QUANTIZABLE_DTYPES = ("float32", "float16", "bfloat16", "float64")  # loaded as float32, then quantized

# Sentiment of short synthetic reviews: a local, deterministic seq-cls task (label 1 = positive).
SUBJECTS = [
    "the film",
    "this book",
    "the meal",
    "our trip",
    "the service",
    "the song",
    "that game",
    "the hotel",
    "this phone",
    "the lecture",
    "the concert",
    "the coffee",
]
POSITIVE = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "brilliant", "enjoyable"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "poor", "disappointing", "horrible", "dull"]
TEMPLATES = ["{s} was {a}.", "I found {s} {a}.", "Honestly, {s} is {a}.", "Everyone said {s} felt {a}."]


# The project's defaults for transformers' TrainingArguments, where they differ from the library's: the one place.
TRAINER_DEFAULTS = {
    "max_steps": 100,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,  # LoRA's few parameters take a rate ~10x a full fine-tune's
    "warmup_steps": 10,
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "save_strategy": "no",  # the adapter is saved once, at the end
    "report_to": "tensorboard",  # in <out>/tb; trackio / wandb runs in the project "tiny-hf"
    "project": PROJECT,
    "seed": 0,
    "remove_unused_columns": False,  # packed blocks and padded batches hold exactly the model's inputs
    "output_dir": "",  # empty: --out (transformers would make ./trainer_output)
}


@dataclass
class LoraOptions:
    """Ours, beside `TrainingArguments`: the model, LoRA (PEFT `LoraConfig`'s field names), the data and the output."""

    model: str = field(default="runs/demo", metadata={"help": "a run folder, a model folder or a Hub id"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or Hub id (default: the model's)"})
    task: str = field(default="causal-lm", metadata={"help": f"one of {list(TASKS)}"})
    r: int = field(default=8, metadata={"help": "LoraConfig.r: the rank of the update B A"})
    lora_alpha: float = field(default=16.0, metadata={"help": "the update is scaled by lora_alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA path's input"})
    target_modules: str = field(default="auto", metadata={"help": "'auto' or comma-separated names: q_proj,v_proj"})
    qlora: bool = field(default=False, metadata={"help": "quantize the base to 4-bit NF4 (bitsandbytes)"})
    merge: bool = field(default=False, metadata={"help": "also export the merged model to --out/merged"})
    data: str | None = field(
        default=None,
        metadata={
            "help": "causal-lm: a data spec (default: the run's, else 'embedded'); "
            "seq-cls: 'sentiment' (default) or a .jsonl/.csv with text,label"
        },
    )
    block_size: int | None = field(default=None, metadata={"help": "causal-lm (default: the run's, else 128)"})
    max_length: int = field(default=64, metadata={"help": "seq-cls: tokens per example"})
    val_fraction: float | None = field(default=None, metadata={"help": "default: the run's, else 0.05"})
    cache_dir: Path | None = field(default=None, metadata={"help": "default: the run's, else data/"})
    eval_blocks: int = field(default=64, metadata={"help": "causal-lm validation blocks (0 = all)"})
    out: Path = field(default=Path("runs/lora"), metadata={"help": "adapter/, merged/ and summary.json go here"})


def parse_args(argv: list[str] | None = None) -> tuple[LoraOptions, TrainingArguments]:
    """Our options and the Trainer's. The Trainer's output_dir is --out unless --output-dir is given (with
    save_strategy 'no' it writes nothing there); `--report-to` is checked here, before anything loads."""
    training, options = parse_options(
        TrainingArguments, LoraOptions, argv=argv, description=__doc__, defaults=TRAINER_DEFAULTS
    )
    training.output_dir = training.output_dir or str(options.out)
    place_trainer_reports(training, options.out)
    return options, training


def check_options(options: LoraOptions) -> None:
    """Bad values fail here, before any model is loaded (TrainingArguments checks its own)."""
    if options.task not in TASKS:
        raise ValueError(f"--task={options.task!r} is not one of {list(TASKS)}")
    if options.r <= 0:
        raise ValueError(f"--r={options.r} must be a positive integer")
    if options.lora_alpha <= 0:
        raise ValueError(f"--lora-alpha={options.lora_alpha} must be positive")
    if not 0.0 <= options.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout={options.lora_dropout} is not in [0, 1)")
    if options.max_length < 1:
        raise ValueError(f"--max-length={options.max_length} must be at least 1")


# --- model -----------------------------------------------------------------------------------------------------------
def bnb_config(skip_modules: list[str] | None) -> BitsAndBytesConfig:
    """QLoRA's recipe: NF4 weights, double quantization of the scales, float32 compute (CPU); heads stay float."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip_modules,
    )


def check_quantizable(source: str, config) -> None:
    """QLoRA needs floating-point weights that are not already quantized by another method."""
    existing = getattr(config, "quantization_config", None)
    if existing is not None:
        existing = existing if isinstance(existing, dict) else existing.to_dict()
        method, four_bit = existing.get("quant_method"), existing.get("load_in_4bit", False)
        if not (str(method).endswith("bitsandbytes") and four_bit):
            raise ValueError(
                f"--qlora: {source} is already quantized (quant_method={method!r}); bitsandbytes 4-bit needs a "
                "float32, float16 or bfloat16 checkpoint: fine-tune it without --qlora or use its float original"
            )
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"--qlora: {source} holds {dtype} weights; bitsandbytes quantizes {list(QUANTIZABLE_DTYPES)}")


def load_model(source: str, task: str, *, qlora: bool, num_labels: int | None = None, pad_token_id: int | None = None):
    """The model for `task` in float32, or in 4-bit NF4 with `qlora` (float heads, norms and embeddings)."""
    auto_class, _ = TASKS[task]
    kwargs = {"dtype": torch.float32}
    if task == "seq-cls":
        kwargs.update(num_labels=num_labels, pad_token_id=pad_token_id)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model {source!r} is not a run folder (run_config.json + model/), a model folder or a Hub id that "
            f"loads here: {error}"
        ) from error
    if qlora:
        check_quantizable(source, config)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a harmless kernel-loading notice on CPU
        # A causal LM keeps transformers' own choice (the output embeddings); a new classifier head stays float.
        kwargs["quantization_config"] = bnb_config(list(HEADS) if task == "seq-cls" else None)
    try:
        model = auto_class.from_pretrained(source, **kwargs)
    except (RuntimeError, ValueError) as error:
        if not qlora:
            raise
        raise ValueError(f"--qlora: bitsandbytes could not quantize {source}: {error}") from error
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if not torch.cuda.is_available():  # the CPU kernels need some layers re-quantized from the float weights
            kwargs.pop("quantization_config")
            model = bnb_cpu_blocks(model, auto_class.from_pretrained(source, **kwargs), portable=True)
    return model


def linear_leaves(model) -> list[str]:
    """Names of the linear layers LoRA can adapt: nn.Linear / Conv1D leaves outside the head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, LINEAR_TYPES)
        and module is not output
        and not any(part in HEADS for part in name.split("."))
    ]


def choose_targets(model, spec: str) -> list[str]:
    """`--target-modules`: 'auto' (TARGET_MODULES by model_type, else all linear leaves but the head, by full name)
    or a comma-separated list, each of which must match a linear layer."""
    if spec == "auto":
        targets = TARGET_MODULES.get(model.config.model_type) or linear_leaves(model)
    else:
        targets = [name.strip() for name in spec.split(",") if name.strip()]
    try:
        find_linear(model, targets, LINEAR_TYPES)
    except ValueError as error:
        raise ValueError(f"--target-modules {spec!r}: {error}") from None
    return targets


def check_quantized_targets(model, targets: list[str]) -> None:
    """QLoRA over layers bitsandbytes left in float would be plain LoRA at 4-bit cost: refuse it."""
    matched = find_linear(model, targets, LINEAR_TYPES)
    kinds = sorted({type(model.get_submodule(name)).__name__ for name in matched})
    if "Linear4bit" not in kinds:
        quantized = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
        )
        raise ValueError(
            f"--qlora: bitsandbytes left every targeted layer in float ({targets} are {kinds}), so this would be "
            f"plain LoRA; target its 4-bit layers: {quantized}"
        )


# --- data ------------------------------------------------------------------------------------------------------------
def sentiment_dataset() -> datasets.DatasetDict:
    """768 synthetic reviews (12 subjects x 16 adjectives x 4 templates), split 80/20 by a hash of the text
    (`tiny_hf.corpus.stable_fraction`)."""
    rows = {"train": {"text": [], "label": []}, "validation": {"text": [], "label": []}}
    for label, adjectives in ((1, POSITIVE), (0, NEGATIVE)):
        for subject in SUBJECTS:
            for adjective in adjectives:
                for template in TEMPLATES:
                    text = template.format(s=subject, a=adjective)
                    text = text[0].upper() + text[1:]
                    split = "validation" if stable_fraction(text) < 0.2 else "train"
                    rows[split]["text"].append(text)
                    rows[split]["label"].append(label)
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns) for split, columns in rows.items()})


def classification_dataset(spec: str, seed: int) -> datasets.DatasetDict:
    """'sentiment', or a .jsonl/.json/.csv file with "text" and integer "label" columns (20% held out)."""
    if spec == "sentiment":
        return sentiment_dataset()
    path = Path(spec)
    if not path.is_file() or path.suffix not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"--data {spec!r} for seq-cls is not 'sentiment' or a .jsonl/.json/.csv file")
    loaded = datasets.load_dataset("csv" if path.suffix == ".csv" else "json", data_files=str(path))["train"]
    if missing := {"text", "label"} - set(loaded.column_names):
        raise ValueError(f"--data {spec!r} lacks columns {sorted(missing)}; it has {loaded.column_names}")
    split = loaded.train_test_split(test_size=0.2, seed=seed)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


@torch.no_grad()
def accuracy(model, tokenizer, texts: list[str], labels: list[int], max_length: int, batch_size: int = 32) -> float:
    """Share of `texts` whose argmax logit is the label."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        predictions = model(**batch.to(model.device)).logits.argmax(-1).cpu()
        correct += (predictions == torch.tensor(labels[start : start + batch_size])).sum().item()
    model.train(was_training)
    return correct / len(texts)


def lm_collate(rows: list[dict]) -> dict:
    """Packed blocks need no padding: the labels are the inputs (the model shifts them)."""
    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)  # (B, T)
    return {"input_ids": ids, "labels": ids}


def lm_task(options: LoraOptions, run_dir: Path | None, tokenizer, seed: int) -> tuple:
    """Causal LM: packed train blocks, and validation loss/perplexity/bits per byte on the run's own validation
    blocks (`validation_set`) for a run folder, else on --data's held-out documents."""
    run = json.loads((run_dir / "run_config.json").read_text()) if run_dir else {}
    block_size = options.block_size or run.get("block_size", 128)
    val_fraction = options.val_fraction if options.val_fraction is not None else run.get("val_fraction", 0.05)
    data = options.data or run.get("data", "embedded")
    train_ds, val_ds = build_datasets(
        data,
        tokenizer,
        block_size,
        seed=seed,
        val_fraction=val_fraction,
        cache_dir=options.cache_dir or run.get("cache_dir", "data"),
    )
    if run_dir:  # the very blocks pretraining was evaluated on
        val_blocks, byte_lengths = validation_set(run_dir, tokenizer, max_blocks=options.eval_blocks)
    else:
        val_blocks = torch.tensor(val_ds["input_ids"], dtype=torch.long)[: options.eval_blocks or None]
        byte_lengths = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.long)
    if len(val_blocks) == 0:
        raise ValueError(f"--data {data!r} gives no validation blocks of {block_size} tokens: raise --val-fraction")

    def measure(model) -> dict:
        return evaluate_lm(model, val_blocks, byte_lengths)

    return data, train_ds.select_columns(["input_ids"]), lm_collate, {"input_ids": val_blocks[:2]}, measure


def classification_task(options: LoraOptions, labelled: datasets.DatasetDict, tokenizer) -> tuple:
    """Sequence classification: tokenized train examples padded per batch, and validation accuracy."""
    texts, labels = labelled["validation"]["text"], labelled["validation"]["label"]

    def encode(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=options.max_length)

    train_ds = labelled["train"].map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    probe = dict(tokenizer(texts[:4], padding=True, return_tensors="pt"))

    def measure(model) -> dict:
        return {"accuracy": accuracy(model, tokenizer, texts, labels, options.max_length)}

    return options.data or "sentiment", train_ds, DataCollatorWithPadding(tokenizer), probe, measure


# --- the run ---------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What the run works on: the tokenizer, the base model, how to load it again, its targets and its task."""

    tokenizer: PreTrainedTokenizerBase
    base: torch.nn.Module
    load_base: Callable[[bool], torch.nn.Module]  # (qlora) -> a fresh base model, for reloading the adapter
    targets: list[str]
    data: str
    train_ds: datasets.Dataset
    collator: Callable[[list[dict]], dict]
    probe: dict  # a batch for logit comparisons
    measure: Callable[[torch.nn.Module], dict]  # taken before and after training


def setup(options: LoraOptions, seed: int) -> Setup:
    """Tokenizer, base model and LoRA targets (bad targets and unquantizable models fail before data is built), then
    the data and the measure."""
    try:
        source, folders = resolve_model(options.model)
    except FileNotFoundError as error:
        raise ValueError(f"--model {options.model}: {error}") from None
    run_dir = find_pretraining_run(folders)
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer or source)
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padding only ever pads seq-cls batches
        tokenizer.pad_token = tokenizer.eos_token
    labelled = classification_dataset(options.data or "sentiment", seed) if options.task == "seq-cls" else None
    num_labels = len(set(labelled["train"]["label"])) if labelled else None

    def load_base(qlora: bool):
        return load_model(
            source, options.task, qlora=qlora, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id
        )

    base = load_base(options.qlora)
    targets = choose_targets(base, options.target_modules)
    if options.qlora:
        check_quantized_targets(base, targets)
    if labelled is None:
        task = lm_task(options, run_dir, tokenizer, seed)
    else:
        task = classification_task(options, labelled, tokenizer)
    return Setup(tokenizer, base, load_base, targets, *task)


def add_lora(options: LoraOptions, base: torch.nn.Module, targets: list[str]):
    """PEFT's LoRA on `targets`; a new head PEFT does not know to train (EXTRA_HEADS) is trained in full."""
    extra_heads = [head for head in EXTRA_HEADS if any(name.endswith(head) for name, _ in base.named_modules())]
    lora_config = LoraConfig(
        r=options.r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        task_type=TASKS[options.task][1],
        modules_to_save=extra_heads or None,
    )
    return get_peft_model(base, lora_config)


@torch.no_grad()
def probe_logits(model, probe: dict) -> torch.Tensor:
    model.eval()
    return model(**probe).logits.float()


def save_and_check(options: LoraOptions, run: Setup, model) -> dict:
    """Save the adapter, reload it onto a fresh base and, with --merge, export the merged model: how far each one's
    logits are from the trained model's."""
    adapter_dir = options.out / "adapter"
    model.save_pretrained(adapter_dir)
    run.tokenizer.save_pretrained(adapter_dir)
    trained = probe_logits(model, run.probe)
    reloaded = PeftModel.from_pretrained(run.load_base(options.qlora), adapter_dir)
    saved = {
        "adapter_dir": str(adapter_dir),
        "reload_max_abs_diff": (probe_logits(reloaded, run.probe) - trained).abs().max().item(),
    }
    if options.merge:  # into a float32 base: with --qlora the merged model is the adapter over the unquantized weights
        merged = PeftModel.from_pretrained(run.load_base(False), adapter_dir).merge_and_unload()
        merged_dir = options.out / "merged"
        tiny_hf.save_model(merged, run.tokenizer, merged_dir)
        saved.update(
            merged_dir=str(merged_dir),
            merged=run.measure(merged),
            merge_max_abs_diff=(probe_logits(merged, run.probe) - trained).abs().max().item(),
        )
    return saved


def main(argv: list[str] | None = None) -> dict:
    options, training = parse_args(argv)
    check_options(options)
    started = time.perf_counter()
    set_seed(training.seed)
    run = setup(options, training.seed)
    before = run.measure(run.base)
    model = add_lora(options, run.base, run.targets)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    print(f"{options.task} on {options.model}: LoRA r={options.r} alpha={options.lora_alpha} on {run.targets}")
    print(f"before: {before}")

    with trainer_tensorboard_dir(options.out):
        trainer = Trainer(model=model, args=training, train_dataset=run.train_ds, data_collator=run.collator)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    after = run.measure(model)
    print(f"after: {after}")

    summary = {
        "model": options.model,
        "task": options.task,
        "data": run.data,
        "qlora": options.qlora,
        "target_modules": run.targets,
        "r": options.r,
        "lora_alpha": options.lora_alpha,
        "lora_dropout": options.lora_dropout,
        "max_steps": training.max_steps,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "before": before,
        "after": after,
        **save_and_check(options, run, model),
        "wall_time_s": time.perf_counter() - started,
    }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "summary.json").write_text(json.dumps(summary, indent=2))
    record_stage(options.out, "lora", options, training, model_dirs=("adapter", "merged"))
    print(json.dumps({key: summary[key] for key in ("before", "after", "merged") if key in summary}))
    return summary


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
