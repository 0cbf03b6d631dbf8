"""Prune a pretrained run and measure the cost: validation perplexity against the share of weights removed.

Methods (tiny_hf/pruning.py): unstructured `magnitude` and `wanda` at each `--sparsities` value, the 2:4 pattern
(`2:4`, `wanda-2:4`) at its fixed 50%, and structured pruning that shrinks the model: `heads`, `neurons` and
`heads+neurons`, at the head/neuron counts closest to the same fractions of the blocks' linear weights. Every row is
evaluated one-shot and again after a short recovery fine-tune (AdamW on training blocks, masks kept), next to the
dense model fine-tuned for the same steps, which separates recovery from plain extra training.

    tiny-hf prune --model runs/demo --results bench/results
    tiny-hf prune --model runs/demo --methods wanda,heads+neurons --recovery-steps 100 \\
        --out runs/pruned-30                                  # also save a 30%-smaller dense model

Writes `pruning.md` / `.json` and `pruning.png` (perplexity vs sparsity per method) to `--results` when given.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import tiny_hf  # registers the "tiny" model type with the Auto classes
from tiny_hf import pruning
from tiny_hf.modeling_tiny import MLPS
from tiny_hf.options import parse_options
from tiny_hf.results import write_results
from training.adapt import train_on_blocks
from training.data import build_datasets
from training.evaluation import evaluate_lm, validation_set
from training.model_card import stage_facts, write_model_card
from training.run_log import find_pretraining_run, write_run_config

STRUCTURED = ("heads", "neurons", "heads+neurons")
ALL_METHODS = (*pruning.METHODS, *STRUCTURED)
TWO_FOUR = ("2:4", "wanda-2:4")  # fixed at 50%, run once whatever --sparsities says


@dataclass
class PruneOptions:
    # model and data
    model: Path = field(default=Path("runs/demo"), metadata={"help": "a pretraining run folder"})
    eval_blocks: int = field(default=64, metadata={"help": "validation blocks (pretraining's default)"})
    calibration_blocks: int = field(default=16, metadata={"help": "training blocks Wanda/structured score on"})
    # what to prune
    methods: str = field(
        default=",".join(ALL_METHODS), metadata={"help": f"comma-separated, from {list(ALL_METHODS)}"}
    )
    sparsities: str = field(default="0.1,0.3,0.5,0.7", metadata={"help": "fractions of the blocks' linear weights"})
    # recovery fine-tune (masks kept)
    recovery_steps: int = field(default=20, metadata={"help": "0 skips it"})
    lr: float = field(default=1e-4, metadata={"help": "constant; higher kicks a converged model off"})
    batch_size: int = field(default=4, metadata={"help": "blocks per recovery step"})
    seed: int = field(default=0)
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    # output
    out: Path | None = field(default=None, metadata={"help": "save a structurally pruned (heads+neurons) model here"})
    out_reduction: float = field(default=0.3, metadata={"help": "share of linear weights --out's model loses"})
    results: Path | None = field(default=None, metadata={"help": "write pruning.md/.json/.png here"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})


def check_options(options: PruneOptions) -> tuple[list[str], list[float]]:
    """--methods and --sparsities as lists; bad values and a folder that is not a run fail here."""
    methods = [m.strip() for m in options.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {options.methods!r}: {unknown or 'none given'}; choose from {list(ALL_METHODS)}")
    sparsities = [float(s) for s in options.sparsities.split(",") if s.strip()]
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad or not sparsities:
        raise ValueError(f"--sparsities {options.sparsities!r}: {bad or 'none given'}; each must be in (0, 1)")
    run = options.model
    if find_pretraining_run([run]) != run or not (run / "model").is_dir():
        raise FileNotFoundError(f"--model {run} is not a pretraining run folder (no run_config.json and model/)")
    return methods, sparsities


def linear_weights(model) -> int:
    """Nonzero weights in the blocks' linear layers: what pruning removes, structured or not."""
    return sum(int(layer.weight.count_nonzero()) for layer in pruning.linear_layers(model).values())


def structured_counts(config, method: str, target: float) -> tuple[int, int] | None:
    """(heads, neurons) to remove per layer so the blocks lose about `target` of their linear weights (biases
    ignored), or None when `method` cannot get there. "heads+neurons" removes about `target` of the heads and
    tops up with neurons."""
    heads, hidden, head_dim = config.num_attention_heads, config.hidden_size, config.head_dim
    group = heads // config.num_key_value_heads
    per_group = (2 * group + 2) * hidden * head_dim  # q and o rows/columns of its query heads, its k and v rows
    per_neuron = (3 if MLPS[config.mlp][0] else 2) * hidden
    per_layer = config.num_key_value_heads * per_group + config.intermediate_size * per_neuron
    candidates = [n for n in pruning.removable_heads(config) if method == "heads+neurons" or n > 0]
    if method == "heads":
        n = min(candidates, key=lambda n: abs(n // group * per_group / per_layer - target))
        return n, 0
    n_heads = min(candidates, key=lambda n: abs(n / heads - target)) if method == "heads+neurons" else 0
    n_neurons = max(0, round((target * per_layer - n_heads // group * per_group) / per_neuron))
    if n_neurons >= config.intermediate_size or n_heads + n_neurons == 0:
        return None
    return n_heads, n_neurons


def plan(methods: list[str], sparsities: list[float], config) -> list[tuple[str, float, tuple[int, int] | None]]:
    """The rows to run: (method, target sparsity, (heads, neurons) for structured methods), duplicates dropped."""
    rows = []
    for method in methods:
        for target in [0.5] if method in TWO_FOUR else sparsities:
            counts = structured_counts(config, method, target) if method in STRUCTURED else None
            # Skip what cannot be reached and what another structured row already removes (same counts).
            if method in STRUCTURED and (counts is None or any(r[2] == counts for r in rows)):
                continue
            rows.append((method, target, counts))
    return rows


def prune_row(model, method: str, target: float, counts, calibration: torch.Tensor) -> dict:
    """Prune `model` in place as the row says; returns the masks (unstructured) or {} (structured)."""
    if method in pruning.METHODS:
        return pruning.prune(model, method, target, calibration=calibration)
    heads, neurons = counts
    if heads:
        pruning.prune_heads(model, heads, calibration)
    if neurons:
        pruning.prune_neurons(model, neurons, calibration)
    return {}


def plot(results: list[dict], baseline: dict, recovery_steps: int, out_png: Path, title: str) -> Path:
    """Perplexity (log scale) against the share of linear weights removed: one colour per method, dashed one-shot,
    solid after recovery; the dense model as grey horizontal lines."""
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    ax.axhline(baseline["val_perplexity"], color="grey", linestyle="--", linewidth=1, label="dense")
    if recovery_steps:
        ax.axhline(baseline["recovered"]["val_perplexity"], color="grey", linewidth=1, label="dense + recovery")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in results)):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["removed"])
        x = [r["removed"] for r in rows]
        color = f"C{i % 10}"
        ax.plot(
            x,
            [r["val_perplexity"] for r in rows],
            color=color,
            marker="o",
            linestyle="--",
            alpha=0.6,
            label=f"{method} (one-shot)" if not recovery_steps else None,
        )
        if recovery_steps:
            y = [r["recovered"]["val_perplexity"] for r in rows]
            ax.plot(x, y, color=color, marker="o", linewidth=1.8, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("share of the blocks' linear weights removed")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(title + ("\ndashed: one-shot; solid: after recovery fine-tune" if recovery_steps else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


@dataclass
class Workbench:
    """What every row is measured with: the dense model, its tokenizer and run config, and the blocks."""

    dense: nn.Module
    tokenizer: PreTrainedTokenizerBase
    run_config: dict
    train_blocks: torch.Tensor  # (N, T): recovery fine-tuning
    calibration: torch.Tensor  # a random subset of train_blocks: Wanda and structured scores
    val_blocks: torch.Tensor
    byte_lengths: torch.Tensor

    def evaluate(self, model: nn.Module) -> dict:
        return evaluate_lm(model, self.val_blocks, self.byte_lengths)


def load_workbench(options: PruneOptions) -> Workbench:
    run = options.model
    dense = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).to(options.device)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    run_config = json.loads((run / "run_config.json").read_text())
    train, _ = build_datasets(
        run_config["data"],
        tokenizer,
        run_config["block_size"],
        seed=run_config.get("seed", 0),
        val_fraction=run_config.get("val_fraction", 0.05),
        cache_dir=run_config.get("cache_dir", "data"),
    )
    train_blocks = torch.tensor(train["input_ids"], dtype=torch.long)  # (N, T)
    generator = torch.Generator().manual_seed(options.seed)
    calibration = train_blocks[torch.randperm(len(train_blocks), generator=generator)[: options.calibration_blocks]]
    val_blocks, byte_lengths = validation_set(run, tokenizer, max_blocks=options.eval_blocks)
    return Workbench(dense, tokenizer, run_config, train_blocks, calibration, val_blocks, byte_lengths)


def recover(options: PruneOptions, bench: Workbench, model: nn.Module, masks: dict) -> dict:
    """The recovery fine-tune (masks kept), then the validation figures."""
    train_on_blocks(
        model,
        bench.train_blocks,
        masks=masks,
        steps=options.recovery_steps,
        lr=options.lr,
        batch_size=options.batch_size,
        seed=options.seed,
    )
    return bench.evaluate(model)


def run_rows(options: PruneOptions, bench: Workbench, rows: list) -> list[dict]:
    """Each planned row on a fresh copy of the dense model: one-shot figures, and after recovery."""
    dense_weights = linear_weights(bench.dense)
    results = []
    progress = tqdm(rows, desc="pruning", disable=options.no_progress)
    for method, target, counts in progress:
        progress.set_postfix(method=method, target=target)
        model = copy.deepcopy(bench.dense)
        masks = prune_row(model, method, target, counts, bench.calibration)
        result = {
            "method": method,
            "target": target,
            "removed": round(1 - linear_weights(model) / dense_weights, 4),
            **({"heads_removed": counts[0], "neurons_removed": counts[1]} if counts else {}),
            **bench.evaluate(model),
        }
        if options.recovery_steps:
            result["recovered"] = recover(options, bench, model, masks)
        results.append(result)
    progress.close()
    return results


def save_pruned(options: PruneOptions, bench: Workbench) -> str:
    """--out: the dense model with heads and neurons removed (--out-reduction of its linear weights), recovered."""
    counts = structured_counts(bench.dense.config, "heads+neurons", options.out_reduction)
    if counts is None:
        raise ValueError(f"--out-reduction {options.out_reduction} is out of reach of heads+neurons pruning")
    model = copy.deepcopy(bench.dense)
    prune_row(model, "heads+neurons", options.out_reduction, counts, bench.calibration)
    if options.recovery_steps:
        recover(options, bench, model, {})
    saved = tiny_hf.export(model, bench.tokenizer, options.out)
    write_run_config(options.out, options, **stage_facts("prune", options))
    write_model_card(options.out, options.out)
    return str(saved)


def markdown_table(
    options: PruneOptions, bench: Workbench, baseline: dict, results: list[dict], seconds: float
) -> str:
    """The Markdown table, under a paragraph saying what was measured on what."""
    config, val_blocks = bench.dense.config, bench.val_blocks
    tokens = options.recovery_steps * options.batch_size * bench.run_config["block_size"]
    lines = [
        f"# {title(options, bench)}",
        "",
        f"{linear_weights(bench.dense) / 1e6:.2f}M weights in the blocks' linear layers are pruned; the embedding "
        f"and tied head stay dense. Validation: {len(val_blocks)} blocks x {val_blocks.shape[1]} tokens of the "
        f"run's held-out documents. Wanda and structured scores: {len(bench.calibration)} training blocks. "
        f"Recovery: {options.recovery_steps} AdamW steps (lr {options.lr:g}, {options.batch_size} blocks each, "
        f"{tokens:,} tokens), masks kept. Structured rows remove whole heads (config: "
        f"{config.num_attention_heads} heads, {config.num_key_value_heads} key/value heads, head_dim "
        f"{config.head_dim}) and MLP neurons (intermediate_size {config.intermediate_size}) from every layer. "
        f"{len(results) + 1} rows in {seconds:.0f} s on {options.device}.",
        "",
        "![perplexity vs sparsity](pruning.png)",
        "",
        "| method | target | weights removed | heads / neurons removed | val ppl one-shot | val ppl recovered "
        "| bits/byte recovered |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cells(r: dict) -> str:
        after = r.get("recovered")
        recovered = f"{after['val_perplexity']:.1f} | {after['val_bits_per_byte']:.3f}" if after else "- | -"
        return f"{r['val_perplexity']:.1f} | {recovered}"

    lines.append(f"| dense | 0 | 0% | - | {cells(baseline)} |")
    for r in results:
        removed = f"{r['heads_removed']} / {r['neurons_removed']}" if "heads_removed" in r else "-"
        lines.append(f"| {r['method']} | {r['target']:g} | {r['removed']:.1%} | {removed} | {cells(r)} |")
    return "\n".join(lines) + "\n"


def title(options: PruneOptions, bench: Workbench) -> str:
    return f"Pruning {options.model.name} ({bench.dense.num_parameters() / 1e6:.2f}M parameters)"


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(PruneOptions, argv=argv, description=__doc__)
    methods, sparsities = check_options(options)
    torch.manual_seed(options.seed)
    bench = load_workbench(options)

    start = time.perf_counter()
    baseline = bench.evaluate(bench.dense)
    if options.recovery_steps:  # the dense model fine-tuned alike: what recovery adds beyond extra training
        baseline["recovered"] = recover(options, bench, copy.deepcopy(bench.dense), {})
    results = run_rows(options, bench, plan(methods, sparsities, bench.dense.config))
    seconds = time.perf_counter() - start
    saved = save_pruned(options, bench) if options.out is not None else None

    table = markdown_table(options, bench, baseline, results, seconds)
    figures = {
        "setup": {k: str(v) for k, v in vars(options).items()},
        "linear_weights": linear_weights(bench.dense),
        "parameters": bench.dense.num_parameters(),
        "baseline": baseline,
        "results": results,
        "seconds": round(seconds, 1),
        "saved": saved,
    }
    if options.results is not None:
        write_results("pruning", figures, table, options.results)
        plot(results, baseline, options.recovery_steps, options.results / "pruning.png", title(options, bench))
    print(table)
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
