"""Results files: a description of the machine, and figures written as JSON plus a markdown table.

Every stage and benchmark that reports figures writes them here; `bench/results/` (from the repository root) is the
default folder.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import random
import re
import statistics
from pathlib import Path

RESULTS_DIR = Path("bench/results")


def machine_info() -> dict:
    """CPU model, core count, GPU (if any) and library versions: figures mean little without them."""
    import tokenizers
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def markdown_cell(text: str, limit: int = 120) -> str:
    """Free text (a generated answer) as one Markdown table cell: whitespace collapsed, pipes escaped, cut to
    `limit` characters with an ellipsis; "(empty)" for nothing."""
    text = re.sub(r"\s+", " ", text).replace("|", "\\|").strip()
    return (text[: limit - 1] + "…" if len(text) > limit else text) or "(empty)"


def write_results(name: str, figures: dict, table_md: str, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write `<name>.json` (figures + machine) and `<name>.md` (the table + a machine line) to `results_dir`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    json_path, md_path = results_dir / f"{name}.json", results_dir / f"{name}.md"
    json_path.write_text(json.dumps({"machine": machine, **figures}, indent=2) + "\n")
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cores']} cores"
    md_path.write_text(
        f"{table_md.rstrip()}\n\nMachine: {where}; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, tokenizers {machine['tokenizers']}; {machine['date']}.\n"
    )
    return json_path, md_path


def spread(values: list[float]) -> dict:
    """n, median, min and max of repeated measurements (the rounds of a benchmark)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentiles(values: list[float]) -> dict:
    """n, median (p50), p99 and max of a sample of timings (p99 by the inclusive method; NaN below 2 values)."""
    if len(values) < 2:
        return {"n": len(values), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"n": len(values), "p50": statistics.median(values), "p99": q[98], "max": max(values)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> dict:
    """A rate with its 95% Wilson score interval (Wilson 1927): unlike the normal approximation it stays inside
    [0, 1] and is honest at 0% or 100% on small n, which is where small models' exact-match rates live."""
    if n < 1:
        raise ValueError(f"a rate needs at least one trial; got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} is not between 0 and n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"n": n, "rate": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half)}


def bootstrap_interval(values: list[float], rounds: int = 2000, seed: int = 0) -> dict:
    """The mean of per-example scores with a 95% percentile-bootstrap interval (Efron 1979): resample the examples
    with replacement `rounds` times, take the 2.5th and 97.5th percentiles of the means. Deterministic by `seed`."""
    if not values:
        raise ValueError("a mean needs at least one value; got none")
    if any(math.isnan(v) for v in values):
        raise ValueError("the scores contain NaN; a mean with an interval needs finite scores")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(rounds))
    return {"n": n, "mean": sum(values) / n, "low": means[int(0.025 * rounds)], "high": means[int(0.975 * rounds) - 1]}


def beyond_noise(a: dict, b: dict) -> bool:
    """True when two 95% intervals ({"low", "high"}) do not overlap: a conservative test that the difference is
    real (non-overlap implies p < 0.05; overlap does not prove the opposite, so the tables say "within noise")."""
    return a["high"] < b["low"] or b["high"] < a["low"]


def interval_cell(figure: dict, percent: bool = False) -> str:
    """`0.42 (0.37–0.47)`, or `42.0% (37.1–47.0)` for a rate: the one way tables print a value with its interval."""
    value = figure["rate"] if "rate" in figure else figure["mean"]
    if percent:
        return f"{100 * value:.1f}% ({100 * figure['low']:.1f}–{100 * figure['high']:.1f})"
    return f"{value:.3f} ({figure['low']:.3f}–{figure['high']:.3f})"
