"""Long context: how far past its training length does a model still work, under which position scheme?

    tiny-hf long-context --model runs/demo --results bench/results
    tiny-hf long-context --model runs/demo --factor 4 --finetune-steps 100 --alibi-model runs/demo-alibi

A RoPE model trained on `--trained-length` tokens (default: the run's block size) is run at up to `--factor` times
that, with its weights unchanged and the rotary frequencies scaled at load time (`rope_parameters`):
- `none`: plain RoPE, extrapolating to angles it never saw;
- `linear`: Position Interpolation (Chen et al. 2023), every position divided by the factor;
- `dynamic`: dynamic NTK (bloc97 2023), the base raised only once the input is longer than the trained length;
- `yarn`: YaRN (Peng et al. 2023), only low frequencies interpolated, attention temperature adjusted;
- `linear+finetune`: Position Interpolation followed by `--finetune-steps` of training on blocks of the long length
  (what Chen et al. found necessary: ~200 steps reach the full window);
- `alibi`: a model trained with ALiBi (Press et al. 2022) at the same length (`--alibi-model`), no change needed.

Two measurements per variant: validation perplexity against token position (buckets of the long sequence: a model
that extrapolates keeps it flat or falling past the trained length), and passkey retrieval (Mohtashami & Jaggi
2023): a number hidden at a given depth of filler text, asked for at the end; accuracy by context length x depth.
Writes `<out>/long_context.{md,json}`, `long_context_ppl.png` and `long_context_passkey.png` (`--results` too).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import tiny_hf  # noqa: F401 (registers the Auto classes)
from tiny_hf.options import parse_options
from tiny_hf.results import write_results
from tiny_hf.runs import resolve_model
from training.adapt import train_on_blocks
from training.data import build_datasets
from training.run_log import find_pretraining_run

SCALINGS = ("none", "linear", "dynamic", "yarn")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = "There is an important number hidden in a lot of irrelevant text. Find it and remember it. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class LongContextOptions:
    # model
    model: str = field(default="runs/demo", metadata={"help": "a pretraining run folder of a RoPE model"})
    trained_length: int | None = field(default=None, metadata={"help": "default: the run's block size"})
    factor: float = field(default=4.0, metadata={"help": "longest context = factor x trained length"})
    variants: str = field(default=",".join(SCALINGS), metadata={"help": f"from {list(SCALINGS)}"})
    finetune_steps: int = field(default=50, metadata={"help": "PI fine-tune steps (0: skip that variant)"})
    finetune_lr: float = field(default=3e-4)
    alibi_model: str | None = field(
        default=None, metadata={"help": "a run folder of an ALiBi model trained like --model"}
    )
    # measurements
    eval_blocks: int = field(default=16, metadata={"help": "validation sequences of the longest length"})
    buckets: int = field(default=8, metadata={"help": "position buckets for the perplexity curve"})
    depths: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "passkey depths (0 = right after the intro)"})
    lengths: str = field(default="0.5,1,2,4", metadata={"help": "passkey lengths, in multiples of trained length"})
    trials: int = field(default=4, metadata={"help": "passkeys per (length, depth) cell"})
    seed: int = field(default=0)
    # output
    out: Path | None = field(default=None, metadata={"help": "default: <model>/long_context"})
    results: Path | None = field(default=None, metadata={"help": "also write the report here (bench/results)"})


# ---------------------------------------------------------------------------------------------------------------------
# Variants: the same weights with scaled rotary frequencies
# ---------------------------------------------------------------------------------------------------------------------
def scaled_config(model_dir: str, scaling: str, factor: float, trained_length: int):
    """The model's config with `scaling` applied for contexts up to factor x trained_length. Validated by TinyConfig:
    a factor below 1 or a non-RoPE model fails here with its message."""
    config = AutoConfig.from_pretrained(model_dir)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is not one of {list(SCALINGS)}")
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1: these scalings extend the context, they do not shrink it")
    longest = math.ceil(factor * trained_length)
    fields = config.to_dict()
    theta = (fields.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    # `dynamic` reads max_position_embeddings as the trained length; the others need the table to cover `longest`.
    fields["max_position_embeddings"] = trained_length if scaling == "dynamic" else max(longest, trained_length)
    if scaling == "none":
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        fields["rope_parameters"] = {"rope_type": scaling, "rope_theta": theta, "factor": float(factor)}
        if scaling == "yarn":
            fields["rope_parameters"]["original_max_position_embeddings"] = trained_length
    return type(config).from_dict(fields)


def load_variant(model_dir: str, scaling: str, factor: float, trained_length: int):
    config = scaled_config(model_dir, scaling, factor, trained_length)
    if config.position_embedding != "rope":
        raise ValueError(f"{model_dir} uses position_embedding={config.position_embedding!r}; RoPE scaling needs rope")
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def loss_by_position(model, blocks: torch.Tensor, buckets: int, batch_size: int = 4) -> list[float]:
    """Mean next-token loss (nats) in `buckets` equal slices of the positions of `blocks` (N, T)."""
    sums = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        sums += loss.sum(0).double()
    per_position = sums / len(blocks)
    return [chunk.mean().item() for chunk in per_position.tensor_split(buckets)]


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt of about `length` tokens with the key sentence at `depth` (0..1) of the filler."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth} is not in [0, 1]")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(INSTRUCTION + needle + QUESTION).input_ids)
    filler_tokens = len(tokenizer(FILLER).input_ids)
    repeats = max(0, round((length - fixed) / filler_tokens))
    before = round(repeats * depth)
    text = INSTRUCTION + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return tokenizer(text).input_ids


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group(0)) if match else None


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int) -> list:
    """Accuracy grid [length][depth]: the share of `trials` random 4-digit keys the model repeats, greedy."""
    rng = random.Random(seed)
    grid = []
    for length in lengths:
        row = []
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = rng.randint(1000, 9999)
                ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key)])
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=6,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                hits += first_integer(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)) == key
            row.append(hits / trials)
        grid.append(row)
    return grid


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def plots(figures: dict, out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    trained, longest = figures["trained_length"], figures["longest"]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    n = figures["buckets"]
    centers = [(i + 0.5) * (longest - 1) / n for i in range(n)]
    for name, row in figures["variants"].items():
        ax.plot(centers, [math.exp(x) for x in row["loss_by_position"]], marker="o", label=name)
    ax.axvline(trained, color="black", linestyle="--", linewidth=1, label="trained length")
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(f"{figures['model']}: perplexity by position, up to {figures['factor']:g}x the trained length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ppl_png = out / "long_context_ppl.png"
    fig.savefig(ppl_png, dpi=110)

    names = list(figures["variants"])
    fig = Figure(figsize=(3 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        grid = figures["variants"][name]["passkey"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(figures["depths"])), [f"{d:g}" for d in figures["depths"]], fontsize=7)
        ax.set_yticks(range(len(figures["passkey_lengths"])), figures["passkey_lengths"], fontsize=7)
        ax.set_xlabel("depth", fontsize=8)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=6, color="white")
    axes[0].set_ylabel("context tokens", fontsize=8)
    fig.suptitle("passkey retrieval accuracy", fontsize=10)
    fig.tight_layout()
    passkey_png = out / "long_context_passkey.png"
    fig.savefig(passkey_png, dpi=110)
    return [ppl_png, passkey_png]


def table(figures: dict) -> str:
    n, trained = figures["buckets"], figures["trained_length"]
    edges = [round(i * (figures["longest"] - 1) / n) for i in range(n + 1)]
    heads = [f"{edges[i]}-{edges[i + 1]}" for i in range(n)]
    lines = [
        f"## Long context: `{figures['model']}`, trained on {trained} tokens, run at up to {figures['longest']}",
        "",
        "Validation perplexity by token position (columns: position ranges; the trained length ends at "
        f"{trained}), and passkey accuracy inside / beyond the trained length.",
        "",
        "| variant | " + " | ".join(heads) + " | passkey <= trained | passkey beyond |",
        "|---|" + "---:|" * n + "---:|---:|",
    ]
    for name, row in figures["variants"].items():
        cells = " | ".join(f"{math.exp(x):.1f}" for x in row["loss_by_position"])
        lines.append(f"| {name} | {cells} | {row['passkey_within']:.0%} | {row['passkey_beyond']:.0%} |")
    lines += [
        "",
        f"{figures['eval_blocks']} validation sequences of {figures['longest']} tokens; passkey: "
        f"{figures['trials']} random 4-digit keys per cell, lengths {figures['passkey_lengths']} x depths "
        f"{figures['depths']}, greedy. Plots: long_context_ppl.png, long_context_passkey.png. "
        f"{figures.get('notes', '')}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Bench:
    """What every variant is measured on: the model folder, its run, the lengths and the validation blocks."""

    model_dir: str
    run_dir: Path
    names: list[str]  # the --variants
    trained: int
    longest: int
    lengths: list[int]  # passkey prompt lengths
    depths: list[float]
    tokenizer: PreTrainedTokenizerBase
    train_blocks: torch.Tensor  # (N, longest): the Position Interpolation fine-tune
    blocks: torch.Tensor  # (eval_blocks, longest): perplexity by position


def load_bench(options: LongContextOptions) -> Bench:
    """Resolve the run and build the long blocks; bad variants, factors and non-RoPE models fail before measuring."""
    model_dir, folders = resolve_model(options.model)
    run_dir = find_pretraining_run(folders)
    if run_dir is None:
        raise FileNotFoundError(f"--model {options.model} is not a pretraining run folder: it has no run_config.json")
    run = json.loads((run_dir / "run_config.json").read_text())
    trained = options.trained_length or run["block_size"]
    names = [v.strip() for v in options.variants.split(",") if v.strip()]
    if unknown := [v for v in names if v not in SCALINGS]:
        raise ValueError(f"--variants {options.variants!r}: {unknown}; choose from {list(SCALINGS)}")
    for name in names:
        scaled_config(model_dir, name, options.factor, trained)
    longest = math.ceil(options.factor * trained)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_args = dict(
        seed=run.get("seed", 0), val_fraction=run.get("val_fraction", 0.05), cache_dir=run.get("cache_dir", "data")
    )
    train_long, val_long = build_datasets(run["data"], tokenizer, longest, **data_args)
    blocks = torch.tensor(val_long["input_ids"][: options.eval_blocks], dtype=torch.long)
    if len(blocks) == 0:
        raise ValueError(f"the run's validation split has no sequence of {longest} tokens: lower --factor")
    return Bench(
        model_dir=model_dir,
        run_dir=run_dir,
        names=names,
        trained=trained,
        longest=longest,
        lengths=[max(16, round(float(x) * trained)) for x in options.lengths.split(",")],
        depths=[float(d) for d in options.depths.split(",")],
        tokenizer=tokenizer,
        train_blocks=torch.tensor(train_long["input_ids"], dtype=torch.long),
        blocks=blocks,
    )


def measure(options: LongContextOptions, bench: Bench, model) -> dict:
    """Perplexity by position and the passkey grid, with its accuracy inside and beyond the trained length."""
    grid = passkey_accuracy(model, bench.tokenizer, bench.lengths, bench.depths, options.trials, options.seed)
    rows = list(zip(bench.lengths, grid, strict=True))
    within = [v for length, row in rows if length <= bench.trained for v in row]
    beyond = [v for length, row in rows if length > bench.trained for v in row]
    return {
        "loss_by_position": loss_by_position(model, bench.blocks, options.buckets),
        "passkey": grid,
        "passkey_within": sum(within) / max(len(within), 1),
        "passkey_beyond": sum(beyond) / max(len(beyond), 1),
    }


def measure_variants(options: LongContextOptions, bench: Bench) -> dict:
    """Every --variants scaling, then Position Interpolation fine-tuned and the ALiBi model when asked for."""
    variants = {}
    for name in bench.names:
        print(f"measuring {name} ...")
        variants[name] = measure(options, bench, load_variant(bench.model_dir, name, options.factor, bench.trained))
    if options.finetune_steps > 0:
        model = load_variant(bench.model_dir, "linear", options.factor, bench.trained)
        losses = train_on_blocks(
            model, bench.train_blocks, steps=options.finetune_steps, lr=options.finetune_lr, seed=options.seed
        )
        model.eval()
        variants["linear+finetune"] = {**measure(options, bench, model), "finetune_losses": losses}
    if options.alibi_model:
        alibi_dir, _ = resolve_model(options.alibi_model)
        alibi = AutoModelForCausalLM.from_pretrained(alibi_dir, dtype=torch.float32).eval()
        if alibi.config.position_embedding != "alibi":
            raise ValueError(
                f"--alibi-model {options.alibi_model} uses {alibi.config.position_embedding!r}, not alibi"
            )
        variants["alibi"] = measure(options, bench, alibi)
    return variants


def run(options: LongContextOptions) -> dict:
    """The stage with `options` (what `main` parses from the command line); returns its figures."""
    started = time.perf_counter()
    bench = load_bench(options)
    figures = {
        "model": options.model,
        "trained_length": bench.trained,
        "factor": options.factor,
        "longest": bench.longest,
        "buckets": options.buckets,
        "eval_blocks": len(bench.blocks),
        "passkey_lengths": bench.lengths,
        "depths": bench.depths,
        "trials": options.trials,
        "variants": measure_variants(options, bench),
    }
    figures["wall_time_s"] = time.perf_counter() - started
    report = table(figures)
    for out in [options.out or bench.run_dir / "long_context"] + ([options.results] if options.results else []):
        out.mkdir(parents=True, exist_ok=True)
        plots(figures, out)
        write_results("long_context", figures, report, out)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(LongContextOptions, argv=argv, description=__doc__)
    return run(options)


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
