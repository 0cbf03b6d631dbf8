"""Attention at long lengths: time and peak memory of one prefill forward, eager vs SDPA vs a sliding window, with
transformers' LlamaModel (SDPA) of the same shape as the peer.

Each (implementation, length) runs in its own child process, so its peak resident memory (`ru_maxrss`) is its own;
the parent only collects. Eager attention materialises the (heads, T, T) score matrix, so its memory grows with T^2
and it is skipped where that matrix alone would pass `--eager-limit-gb`; SDPA's fused kernel does not keep it.

    tiny-hf bench attention-cost                        # CPU: 1k..16k tokens, 2 layers, 256 wide
    tiny-hf bench attention-cost --device cuda --lengths 1024,4096,16384,65536
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from tiny_hf.results import RESULTS_DIR, write_results

IMPLEMENTATIONS = ("eager", "sdpa", "sliding", "llama-sdpa")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("shape")
    shape.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    shape.add_argument("--layers", type=int, default=2)
    shape.add_argument("--hidden", type=int, default=256)
    shape.add_argument("--heads", type=int, default=4)
    shape.add_argument("--window", type=int, default=512, help="the sliding window, in tokens")
    run = parser.add_argument_group("run")
    run.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    run.add_argument("--eager-limit-gb", type=float, default=6.0, help="skip eager where scores pass this")
    run.add_argument("--repeats", type=int, default=2, help="timed forwards after one warm-up")
    run.add_argument("--device", default="cpu")
    run.add_argument("--results", type=Path, default=RESULTS_DIR)
    run.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "implementation:length"
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """Build the model for one implementation, run `repeats` prefill forwards at one length, report."""
    import torch
    from transformers import LlamaModel

    from tiny_hf import TinyConfig, TinyModel
    from tiny_hf.convert import llama_config

    implementation, length = args.child.split(":")
    length = int(length)
    config = TinyConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=length,
        sliding_window=args.window if implementation == "sliding" else None,
    )
    torch.manual_seed(0)
    if implementation == "llama-sdpa":
        model = LlamaModel(llama_config(config))
        model.config._attn_implementation = "sdpa"
    else:
        model = TinyModel(config)
        model.config._attn_implementation = "eager" if implementation == "eager" else "sdpa"
    model = model.to(args.device).eval()
    ids = torch.randint(0, 1024, (1, length), device=args.device)
    times = []
    with torch.no_grad():
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    if args.device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    seconds = min(times)
    return {
        "implementation": implementation,
        "length": length,
        "seconds": seconds,
        "tokens_per_s": length / seconds,
        "peak_mb": peak_mb,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    implementations = [i.strip() for i in args.implementations.split(",") if i.strip()]
    if unknown := [i for i in implementations if i not in IMPLEMENTATIONS]:
        raise ValueError(f"--implementations: {unknown}; choose from {list(IMPLEMENTATIONS)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for length in lengths:
        for implementation in implementations:
            scores_gb = args.heads * length * length * 4 / 1e9  # one layer's fp32 (heads, T, T) score matrix
            if implementation == "eager" and scores_gb > args.eager_limit_gb:
                rows.append({"implementation": implementation, "length": length, "skipped": f"{scores_gb:.0f} GB"})
                continue
            command = [
                sys.executable,
                __file__,
                "--child",
                f"{implementation}:{length}",
                "--layers",
                str(args.layers),
                "--hidden",
                str(args.hidden),
                "--heads",
                str(args.heads),
                "--window",
                str(args.window),
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"implementation": implementation, "length": length, "skipped": "failed"})
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    figures = {
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": args.heads,
        "window": args.window,
        "device": args.device,
        "rows": rows,
    }
    write_results(
        f"attention_cost_{args.device.split(':')[0]}", figures, table(figures, lengths, implementations), args.results
    )
    print(table(figures, lengths, implementations))
    return figures


def table(figures: dict, lengths: list[int], implementations: list[str]) -> str:
    by_key = {(r["implementation"], r["length"]): r for r in figures["rows"]}

    def cell(implementation: str, length: int) -> str:
        r = by_key.get((implementation, length))
        if r is None or "skipped" in r:
            return f"skipped ({r['skipped']})" if r else "-"
        return f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_mb']:,.0f} MB"

    lines = [
        f"Prefill of one sequence, {figures['layers']} layers x {figures['hidden']} wide, {figures['heads']} heads, "
        f"{figures['device']}, fp32: tokens/s and peak memory of the process. `sliding` = window {figures['window']} "
        "(SDPA with the window mask); `llama-sdpa` = transformers' LlamaModel, same shape.",
        "",
        "| tokens | " + " | ".join(implementations) + " |",
        "|---:|" + "---|" * len(implementations),
    ]
    for length in lengths:
        lines.append(f"| {length:,} | " + " | ".join(cell(i, length) for i in implementations) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
