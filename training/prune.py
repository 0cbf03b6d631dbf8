"""Prune a pretrained run and measure the cost: validation perplexity against the share of weights removed.

Methods (tiny_hf/pruning.py): unstructured `magnitude` and `wanda` at each `--sparsities` value, the 2:4 pattern
(`2:4`, `wanda-2:4`) at its fixed 50%, and structured pruning that shrinks the model: `heads`, `neurons` and
`heads+neurons`, at the head/neuron counts closest to the same fractions of the blocks' linear weights. Every row is
evaluated one-shot and again after a short recovery fine-tune (AdamW on training blocks, masks kept), next to the
dense model fine-tuned for the same steps, which separates recovery from plain extra training.

    python training/prune.py --model runs/demo --results bench/results
    python training/prune.py --model runs/demo --methods wanda,heads+neurons --recovery-steps 100 \\
        --out runs/pruned-30                                  # also save a 30%-smaller dense model

Writes `pruning.md` / `.json` and `pruning.png` (perplexity vs sparsity per method) to `--results` when given.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_hf  # registers the "tiny" model type with the Auto classes
from tiny_hf import pruning
from tiny_hf.modeling_tiny import MLPS
from training.adapt import train_on_blocks
from training.data import build_datasets
from training.evaluation import evaluate_lm, validation_set

STRUCTURED = ("heads", "neurons", "heads+neurons")
ALL_METHODS = (*pruning.METHODS, *STRUCTURED)
TWO_FOUR = ("2:4", "wanda-2:4")  # fixed at 50%, run once whatever --sparsities says


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", type=Path, default=Path("runs/demo"), help="a pretraining run folder")
    source.add_argument("--eval-blocks", type=int, default=64, help="validation blocks (pretraining's default)")
    source.add_argument("--calibration-blocks", type=int, default=16, help="training blocks Wanda/structured score on")
    what = parser.add_argument_group("what to prune")
    what.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated, from {list(ALL_METHODS)}")
    what.add_argument("--sparsities", default="0.1,0.3,0.5,0.7", help="fractions of the blocks' linear weights")
    recovery = parser.add_argument_group("recovery fine-tune (masks kept)")
    recovery.add_argument("--recovery-steps", type=int, default=20, help="0 skips it")
    recovery.add_argument("--lr", type=float, default=1e-4, help="constant; higher kicks a converged model off")
    recovery.add_argument("--batch-size", type=int, default=4)
    recovery.add_argument("--seed", type=int, default=0)
    recovery.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="save a structurally pruned (heads+neurons) model here")
    out.add_argument("--out-reduction", type=float, default=0.3, help="share of linear weights --out's model loses")
    out.add_argument("--results", type=Path, default=None, help="write pruning.md/.json/.png here")
    out.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: {unknown or 'none given'}; choose from {list(ALL_METHODS)}")
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad or not sparsities:
        raise ValueError(f"--sparsities {args.sparsities!r}: {bad or 'none given'}; each must be in (0, 1)")
    run = args.model
    if not (run / "run_config.json").is_file() or not (run / "model").is_dir():
        raise FileNotFoundError(f"--model {run} is not a pretraining run folder (no run_config.json and model/)")
    torch.manual_seed(args.seed)

    dense = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).to(args.device)
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
    generator = torch.Generator().manual_seed(args.seed)
    calibration = train_blocks[torch.randperm(len(train_blocks), generator=generator)[: args.calibration_blocks]]
    val_blocks, byte_lengths = validation_set(run, tokenizer, max_blocks=args.eval_blocks)
    dense_weights = linear_weights(dense)

    def recover(model, masks) -> dict:
        train_on_blocks(
            model,
            train_blocks,
            masks=masks,
            steps=args.recovery_steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        return evaluate_lm(model, val_blocks, byte_lengths)

    start = time.perf_counter()
    baseline = evaluate_lm(dense, val_blocks, byte_lengths)
    if args.recovery_steps:
        baseline["recovered"] = recover(copy.deepcopy(dense), {})
    rows = plan(methods, sparsities, dense.config)
    results = []
    progress = tqdm(rows, desc="pruning", disable=args.no_progress)
    for method, target, counts in progress:
        progress.set_postfix(method=method, target=target)
        model = copy.deepcopy(dense)
        masks = prune_row(model, method, target, counts, calibration)
        result = {
            "method": method,
            "target": target,
            "removed": round(1 - linear_weights(model) / dense_weights, 4),
            **({"heads_removed": counts[0], "neurons_removed": counts[1]} if counts else {}),
            **evaluate_lm(model, val_blocks, byte_lengths),
        }
        if args.recovery_steps:
            result["recovered"] = recover(model, masks)
        results.append(result)
    progress.close()
    seconds = time.perf_counter() - start

    saved = None
    if args.out is not None:
        counts = structured_counts(dense.config, "heads+neurons", args.out_reduction)
        if counts is None:
            raise ValueError(f"--out-reduction {args.out_reduction} is out of reach of heads+neurons pruning")
        model = copy.deepcopy(dense)
        prune_row(model, "heads+neurons", args.out_reduction, counts, calibration)
        if args.recovery_steps:
            recover(model, {})
        saved = str(tiny_hf.export(model, tokenizer, args.out))

    config = dense.config
    tokens = args.recovery_steps * args.batch_size * run_config["block_size"]
    title = f"Pruning {run.name} ({dense.num_parameters() / 1e6:.2f}M parameters)"
    lines = [
        f"# {title}",
        "",
        f"{dense_weights / 1e6:.2f}M weights in the blocks' linear layers are pruned; the embedding and tied head "
        f"stay dense. Validation: {len(val_blocks)} blocks x {val_blocks.shape[1]} tokens of the run's held-out "
        f"documents. Wanda and structured scores: {len(calibration)} training blocks. Recovery: "
        f"{args.recovery_steps} AdamW steps (lr {args.lr:g}, {args.batch_size} blocks each, {tokens:,} tokens), "
        "masks kept. Structured rows remove whole heads (config: "
        f"{config.num_attention_heads} heads, {config.num_key_value_heads} key/value heads, head_dim "
        f"{config.head_dim}) and MLP neurons (intermediate_size {config.intermediate_size}) from every layer. "
        f"{len(results) + 1} rows in {seconds:.0f} s on {args.device}.",
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
    table = "\n".join(lines) + "\n"
    figures = {
        "setup": {k: str(v) for k, v in vars(args).items()},
        "linear_weights": dense_weights,
        "parameters": dense.num_parameters(),
        "baseline": baseline,
        "results": results,
        "seconds": round(seconds, 1),
        "saved": saved,
    }
    if args.results is not None:
        from tiny_hf.results import write_results

        write_results("pruning", figures, table, args.results)
        plot(results, baseline, args.recovery_steps, args.results / "pruning.png", title)
    print(table)
    return figures


if __name__ == "__main__":
    main()
