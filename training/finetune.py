"""LoRA and QLoRA fine-tuning with PEFT: `python training/finetune.py --model runs/demo --out runs/lora-demo`.

LoRA (Hu et al. 2021) freezes the pretrained weights and trains a low-rank update B A beside chosen linear layers;
QLoRA (Dettmers et al. 2023) does the same over a base quantized to 4-bit NF4 with bitsandbytes. What happens:
1. Model: --model is a pretraining run folder (model/ + run_config.json), a model folder or a Hub id: our models or
   any causal LM (--task causal-lm) or sequence classifier (--task seq-cls) that transformers loads. --qlora loads
   it in 4-bit NF4 with float32 compute and runs `prepare_model_for_kbit_training`.
2. LoRA: --target-modules auto picks the layers per architecture (TARGET_MODULES, keyed by `config.model_type`;
   otherwise every linear layer but the head); a classification head is trained in full (`modules_to_save`).
3. Data: causal LM: packed blocks from training/data.py (a run folder's own data, block size and split unless
   --data/--block-size say otherwise); seq-cls: 'sentiment' (short synthetic reviews built here, deterministic) or
   a .jsonl/.csv file with "text" and "label" columns.
4. Training: transformers' Trainer. Before and after it: validation loss, perplexity and bits per byte
   (training/evaluation.py, the run's own validation blocks for a run folder), or accuracy for seq-cls.
5. Output in --out: adapter/ (reloaded with `PeftModel.from_pretrained` to check it gives the same logits),
   merged/ with --merge (`merge_and_unload` into a full-precision base: a plain model folder), summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
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
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

import tiny_hf  # registers the Auto classes
from tiny_hf.lora import find_linear
from tiny_hf.quantization import bnb_cpu_blocks
from tiny_hf.runs import resolve_model
from training.data import build_datasets, token_byte_lengths
from training.evaluation import evaluate_lm, validation_set

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="runs/demo", help="a run folder, a model folder or a Hub id")
    model.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    model.add_argument("--task", default="causal-lm", help=f"one of {list(TASKS)}")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=8, help="r, the rank of the update B A")
    lora.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    lora.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA path's input")
    lora.add_argument("--target-modules", default="auto", help="'auto' or comma-separated names: q_proj,v_proj")
    lora.add_argument("--qlora", action="store_true", help="quantize the base to 4-bit NF4 (bitsandbytes)")
    lora.add_argument("--merge", action="store_true", help="also export the merged model to --out/merged")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=None,
        help="causal-lm: a data spec (default: the run's, else 'embedded'); "
        "seq-cls: 'sentiment' (default) or a .jsonl/.csv with text,label",
    )
    data.add_argument("--block-size", type=int, default=None, help="causal-lm (default: the run's, else 128)")
    data.add_argument("--max-length", type=int, default=64, help="seq-cls: tokens per example")
    data.add_argument("--val-fraction", type=float, default=None, help="default: the run's, else 0.05")
    data.add_argument("--cache-dir", type=Path, default=None, help="default: the run's, else data/")
    data.add_argument("--eval-blocks", type=int, default=64, help="causal-lm validation blocks (0 = all)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--max-steps", type=int, default=100)
    optim.add_argument("--batch-size", type=int, default=8)
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--warmup-steps", type=int, default=10)
    optim.add_argument("--weight-decay", type=float, default=0.0)
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("runs/lora"))
    output.add_argument("--log-every", type=int, default=10)
    output.add_argument("--no-progress", action="store_true")
    system = parser.add_argument_group("system")
    system.add_argument("--seed", type=int, default=0)
    system.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Bad values fail here, before any model is loaded."""
    if args.task not in TASKS:
        raise ValueError(f"--task={args.task!r} is not one of {list(TASKS)}")
    if args.rank <= 0:
        raise ValueError(f"--rank={args.rank} must be a positive integer")
    if args.alpha <= 0:
        raise ValueError(f"--alpha={args.alpha} must be positive")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout={args.dropout} is not in [0, 1)")
    for name in ("max_steps", "batch_size", "max_length", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")


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
    """768 synthetic reviews (12 subjects x 16 adjectives x 4 templates), split 80/20 by a hash of the text."""
    rows = {"train": {"text": [], "label": []}, "validation": {"text": [], "label": []}}
    for label, adjectives in ((1, POSITIVE), (0, NEGATIVE)):
        for subject in SUBJECTS:
            for adjective in adjectives:
                for template in TEMPLATES:
                    text = template.format(s=subject, a=adjective)
                    text = text[0].upper() + text[1:]
                    split = "validation" if zlib.crc32(text.encode()) % 5 == 0 else "train"
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


def lm_task(args: argparse.Namespace, run_dir: Path | None, tokenizer) -> tuple:
    """Causal LM: packed train blocks, and validation loss/perplexity/bits per byte on the run's own validation
    blocks (`validation_set`) for a run folder, else on --data's held-out documents."""
    run = json.loads((run_dir / "run_config.json").read_text()) if run_dir else {}
    block_size = args.block_size or run.get("block_size", 128)
    val_fraction = args.val_fraction if args.val_fraction is not None else run.get("val_fraction", 0.05)
    data = args.data or run.get("data", "embedded")
    train_ds, val_ds = build_datasets(
        data,
        tokenizer,
        block_size,
        seed=args.seed,
        val_fraction=val_fraction,
        cache_dir=args.cache_dir or run.get("cache_dir", "data"),
    )
    if run_dir:  # the very blocks pretraining was evaluated on
        val_blocks, byte_lengths = validation_set(run_dir, tokenizer, max_blocks=args.eval_blocks)
    else:
        val_blocks = torch.tensor(val_ds["input_ids"], dtype=torch.long)[: args.eval_blocks or None]
        byte_lengths = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.long)
    if len(val_blocks) == 0:
        raise ValueError(f"--data {data!r} gives no validation blocks of {block_size} tokens: raise --val-fraction")

    def measure(model) -> dict:
        return evaluate_lm(model, val_blocks, byte_lengths)

    return data, train_ds.select_columns(["input_ids"]), lm_collate, {"input_ids": val_blocks[:2]}, measure


def classification_task(args: argparse.Namespace, labelled: datasets.DatasetDict, tokenizer) -> tuple:
    """Sequence classification: tokenized train examples padded per batch, and validation accuracy."""
    texts, labels = labelled["validation"]["text"], labelled["validation"]["label"]

    def encode(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    train_ds = labelled["train"].map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    probe = dict(tokenizer(texts[:4], padding=True, return_tensors="pt"))

    def measure(model) -> dict:
        return {"accuracy": accuracy(model, tokenizer, texts, labels, args.max_length)}

    return args.data or "sentiment", train_ds, DataCollatorWithPadding(tokenizer), probe, measure


# --- the run ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    started = time.perf_counter()
    set_seed(args.seed)
    try:
        source, folders = resolve_model(args.model)
    except FileNotFoundError as error:
        raise ValueError(f"--model {args.model}: {error}") from None
    run_dir = next((folder for folder in folders if (folder / "run_config.json").is_file()), None)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or source)
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padding only ever pads seq-cls batches
        tokenizer.pad_token = tokenizer.eos_token

    # 1. The base model and the layers to adapt: bad targets and unquantizable models fail before data is built.
    labelled = classification_dataset(args.data or "sentiment", args.seed) if args.task == "seq-cls" else None
    num_labels = len(set(labelled["train"]["label"])) if labelled else None

    def load_base(qlora: bool):
        return load_model(source, args.task, qlora=qlora, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)

    base = load_base(args.qlora)
    targets = choose_targets(base, args.target_modules)
    if args.qlora:
        check_quantized_targets(base, targets)

    # 2. Data, the measure taken before and after training, and a probe batch for logit comparisons.
    if labelled is None:
        data, train_ds, collator, probe, measure = lm_task(args, run_dir, tokenizer)
    else:
        data, train_ds, collator, probe, measure = classification_task(args, labelled, tokenizer)

    @torch.no_grad()
    def logits(model) -> torch.Tensor:
        model.eval()
        return model(**probe).logits.float()

    # 3. LoRA on the chosen layers.
    before = measure(base)
    extra_heads = [head for head in EXTRA_HEADS if any(name.endswith(head) for name, _ in base.named_modules())]
    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        task_type=TASKS[args.task][1],
        modules_to_save=extra_heads or None,
    )
    model = get_peft_model(base, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    print(f"{args.task} on {args.model}: LoRA r={args.rank} alpha={args.alpha} on {targets}, before: {before}")

    # 4. Train.
    training_args = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=args.weight_decay,
        logging_steps=args.log_every,
        save_strategy="no",
        report_to="none",
        use_cpu=args.cpu or not torch.cuda.is_available(),
        bf16=False,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=args.no_progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, data_collator=collator)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    after = measure(model)
    print(f"after: {after}")

    # 5. Save the adapter, reload it onto a fresh base, and optionally export the merged model.
    adapter_dir = args.out / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(load_base(args.qlora), adapter_dir)
    trained_logits = logits(model)
    summary = {
        "model": args.model,
        "task": args.task,
        "data": data,
        "qlora": args.qlora,
        "target_modules": targets,
        "rank": args.rank,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "max_steps": args.max_steps,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "before": before,
        "after": after,
        "adapter_dir": str(adapter_dir),
        "reload_max_abs_diff": (logits(reloaded) - trained_logits).abs().max().item(),
    }
    if args.merge:  # into a float32 base: with --qlora the merged model is the adapter over the unquantized weights
        merged = PeftModel.from_pretrained(load_base(False), adapter_dir).merge_and_unload()
        merged_dir = args.out / "merged"
        tiny_hf.save_model(merged, tokenizer, merged_dir)
        summary.update(
            merged_dir=str(merged_dir),
            merged=measure(merged),
            merge_max_abs_diff=(logits(merged) - trained_logits).abs().max().item(),
        )
    summary["wall_time_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({key: summary[key] for key in ("before", "after", "merged") if key in summary}))
    return summary


if __name__ == "__main__":
    main()
