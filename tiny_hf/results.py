"""Results files: a description of the machine, and figures written as JSON plus a markdown table.

Every stage and benchmark that reports figures writes them here; `bench/results/` (from the repository root) is the
default folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
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
