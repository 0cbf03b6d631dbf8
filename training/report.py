"""The end of a run: read its `metrics.jsonl`, plot loss curves, write `summary.md`.

`metrics.jsonl` holds one JSON object per line. Training lines have `step`, `tokens`, `loss` (and `lr`,
`tokens_per_s`, `grad_norm`, ...), evaluation lines `val_loss`, `val_perplexity`, `val_bits_per_byte`, a skipped
step `{"step": 37, "skipped": "loss spike", "loss": 50.0}`, samples `{"step": 100, "samples": [...]}`. Every
function here reads only the keys it needs, so new keys never break it.

Plots are drawn on a bare `matplotlib.figure.Figure` (rendered by Agg), never through pyplot: no display is needed
and no global backend or figure state changes in the process that calls us.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

# The metrics file is written and read by training/run_log.py; the names stay importable from here too.
from training.run_log import METRICS_FILE as METRICS_FILE
from training.run_log import read_metrics

LOSS_CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.md"
# The config fields worth a line in a summary, in reading order; the rest of `config.to_dict()` is noise there.
SUMMARY_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "position_embedding",
    "rope_parameters",
    "norm",
    "qk_norm",
    "mlp",
    "block",
    "sliding_window",
    "tie_word_embeddings",
    "logit_softcap",
    "zero_init_output",
    "attn_implementation",
)


def train_records(records: list[dict]) -> list[dict]:
    """The logged training steps: records with a `loss` that are not skipped steps."""
    return [r for r in records if "loss" in r and "skipped" not in r]


def eval_records(records: list[dict]) -> list[dict]:
    """The evaluations: records with a `val_loss`."""
    return [r for r in records if "val_loss" in r]


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` points, the window shrinking symmetrically at the ends. Centred, unlike
    an exponential average: that one lags a falling loss, and the lag shows most at the end, where runs are compared.
    """
    half = window // 2
    out = []
    for i in range(len(values)):
        h = min(half, i, len(values) - 1 - i)
        out.append(sum(values[i - h : i + h + 1]) / (2 * h + 1))
    return out


def plot_loss_curves(
    runs: dict[str, Path | list[dict]], out_png: str | Path, title: str = "", window: int | None = None
) -> Path:
    """Train loss (light raw line, solid smoothed line) and validation loss (markers) against tokens seen, one colour
    per run: one run for `loss_curve.png`, several for an ablation.

    Args:
        runs: Legend label -> a run folder, a metrics file, or already-read records.
        out_png: Where to write the PNG (parent folders are created).
        title: Figure title.
        window: Points in the train loss moving average; None picks ~1/20 of the logged steps, 1 draws the raw
            curve only.

    Returns:
        `out_png` as a Path.
    """
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 (1 = no smoothing)")
    loaded = {label: source if isinstance(source, list) else read_metrics(source) for label, source in runs.items()}
    curves = {label: (train_records(records), eval_records(records)) for label, records in loaded.items()}
    if not any(train or evals for train, evals in curves.values()):
        raise ValueError(f"no loss or val_loss records to plot in {list(runs)}")
    # Tokens make runs with different batch sizes comparable; fall back to steps if any record lacks them.
    plotted = [r for train, evals in curves.values() for r in train + evals]
    x_key = "tokens" if all("tokens" in r for r in plotted) else "step"

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    for i, (label, (train, evals)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if train:
            x = [r[x_key] for r in train]
            y = [r["loss"] for r in train]
            points = window if window is not None else len(y) // 20
            smoothed = points > 1
            ax.plot(x, y, color=color, alpha=0.3 if smoothed else 1.0, linewidth=1, label=None if smoothed else label)
            if smoothed:
                ax.plot(x, smooth(y, points), color=color, linewidth=1.8, label=label)
        if evals:
            ax.plot(
                [r[x_key] for r in evals],
                [r["val_loss"] for r in evals],
                color=color,
                marker="o",
                markersize=5,
                linestyle="--",
                linewidth=1,
                label=f"{label} (validation)",
            )
    ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
    ax.xaxis.set_major_formatter(EngFormatter())  # 1.2 M, not 1200000
    ax.set_ylabel("loss (nats per token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def format_value(value) -> str:
    """A number as a person reads it in a table: thousands separators for ints, 4 significant decimals for floats."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    return str(value)


def format_duration(seconds: float) -> str:
    """1234.5 -> '20 min 34 s'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def run_results(records: list[dict]) -> dict:
    """The headline numbers of a run from its records; keys are absent where the records do not have them.

    Keys: final_train_loss, final_train_step, best_val_loss, best_val_step, val_loss, val_perplexity,
    val_bits_per_byte, val_step (the last evaluation), tokens, tokens_per_s (median over logged steps),
    wall_time (seconds, if logged), skipped_steps.
    """
    results = {}
    train, evals = train_records(records), eval_records(records)
    if train:
        results.update(final_train_loss=train[-1]["loss"], final_train_step=train[-1].get("step"))
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        results.update(best_val_loss=best["val_loss"], best_val_step=best.get("step"))
        last = evals[-1]
        results.update({k: last[k] for k in ("val_loss", "val_perplexity", "val_bits_per_byte") if k in last})
        results["val_step"] = last.get("step")
    tokens = [r["tokens"] for r in records if "tokens" in r]
    if tokens:
        results["tokens"] = max(tokens)
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    if speeds:
        # The median, because the first logged interval includes start-up and evaluation pauses inflate others.
        results["tokens_per_s"] = statistics.median(speeds)
    walls = [r[k] for r in records for k in ("wall_time", "elapsed_s") if k in r]
    if walls:
        results["wall_time"] = max(walls)
    results["skipped_steps"] = sum(1 for r in records if "skipped" in r)
    return results


def write_summary(run_dir: str | Path, config: dict, extra: dict | None = None) -> Path:
    """Write `summary.md` in a run folder: the headline numbers, the model config as a short table, the loss curve
    (drawn here if the folder has none) and the last generated samples.

    Args:
        run_dir: The run folder, holding `metrics.jsonl`.
        config: The model config (`model.config.to_dict()`); only the fields in SUMMARY_CONFIG_KEYS are shown.
        extra: More rows for the results table (e.g. `{"world_size": 2}`); `wall_time` in seconds is formatted.

    Returns:
        The path of `summary.md`.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    results = run_results(records)
    extra = dict(extra or {})
    if "wall_time" in extra:
        results["wall_time"] = extra.pop("wall_time")

    rows = []
    if "final_train_loss" in results:
        rows.append(("final train loss", f"{results['final_train_loss']:.4f} (step {results['final_train_step']})"))
    if "best_val_loss" in results:
        rows.append(("best validation loss", f"{results['best_val_loss']:.4f} (step {results['best_val_step']})"))
    if "val_loss" in results:
        rows.append(("final validation loss", f"{results['val_loss']:.4f} (step {results['val_step']})"))
    if "val_perplexity" in results:
        rows.append(("final validation perplexity", f"{results['val_perplexity']:.2f}"))
    if "val_bits_per_byte" in results:
        rows.append(("final validation bits per byte", f"{results['val_bits_per_byte']:.4f}"))
    if "tokens" in results:
        rows.append(("tokens seen", f"{results['tokens']:,}"))
    if "wall_time" in results:
        rows.append(("wall time", format_duration(results["wall_time"])))
    if "tokens_per_s" in results:
        rows.append(("tokens/s (median)", f"{results['tokens_per_s']:,.0f}"))
    rows.append(("skipped steps", str(results["skipped_steps"])))
    rows += [(key.replace("_", " "), format_value(value)) for key, value in extra.items()]

    shown = {k: config[k] for k in SUMMARY_CONFIG_KEYS if k in config}
    run_config = run_dir / "run_config.json"  # pretrain.py's arguments; it also records the parameter count
    if run_config.is_file():
        parameters = json.loads(run_config.read_text()).get("parameters")
        if parameters is not None:
            shown["parameters"] = parameters

    if not (run_dir / LOSS_CURVE_FILE).exists() and ("final_train_loss" in results or "val_loss" in results):
        plot_loss_curves({run_dir.name: records}, run_dir / LOSS_CURVE_FILE, title=run_dir.name)

    lines = [f"# Run summary: {run_dir.name}", "", "| | |", "|---|---:|"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    lines += ["", "## Model", "", "| field | value |", "|---|---|"]
    lines += [f"| {key} | {format_value(value)} |" for key, value in shown.items()]
    if (run_dir / LOSS_CURVE_FILE).exists():
        lines += ["", "## Loss", "", f"![loss curve]({LOSS_CURVE_FILE})"]
    samples = [r for r in records if "samples" in r]
    if samples:
        lines += ["", f"## Samples at step {samples[-1].get('step')}", ""]
        lines += ["```text", *(repr(s) for s in samples[-1]["samples"]), "```"]
    path = run_dir / SUMMARY_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
