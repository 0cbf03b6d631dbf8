"""End-to-end training speed: training/pretrain.py (data, curriculum reshaping, guard, logging, progress bar
included) against the bare model step on the same model and batch, in one process.

The bare step is what the loop cannot avoid: forward, loss, backward, gradient clipping, AdamW. The difference is
what the pipeline costs; the goal is to lose at most 10% of the bare throughput. Rounds alternate bare and pipeline
so drift in machine speed hits both alike.

    tiny-hf bench train-speed                      # CPU, tiny-3m, batch 16 x 256
    tiny-hf bench train-speed --preset gpt2-small --batch 16 --block-size 1024 --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tiny_hf import TinyConfig, TinyForCausalLM
from tiny_hf.results import RESULTS_DIR, write_results
from tiny_hf.system import keep_freed_memory
from training import pretrain

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("shape")
    shape.add_argument("--preset", default="tiny-3m")
    shape.add_argument("--batch", type=int, default=16)
    shape.add_argument("--block-size", type=int, default=256)
    shape.add_argument("--vocab-size", type=int, default=8192, help="of the tokenizer trained for the runs")
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, default=40, help="steps per measurement")
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--compile", action="store_true")
    run.add_argument("--data", default="embedded")
    run.add_argument("--cache-dir", type=Path, default=ROOT / "data")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS_DIR)
    out.add_argument("--name", default=None, help="results file stem (default: train_speed_<device>)")
    return parser.parse_args(argv)


def bare_tokens_per_s(config: TinyConfig, args: argparse.Namespace, device: torch.device) -> float:
    """Median tokens/s of the unavoidable step on random blocks: no data pipeline, no logging."""
    torch.manual_seed(0)
    model = TinyForCausalLM(config).to(device).train()
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.block_size), device=device)
    times = []
    for step in range(args.steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(input_ids=ids, use_cache=False).logits
        _, loss = pretrain.lm_loss(logits, ids, 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # the first steps allocate and (with --compile) compile
            times.append(time.perf_counter() - start)
    return args.batch * args.block_size / statistics.median(times)


def run_options(args: argparse.Namespace, out: Path, **fields) -> pretrain.PretrainOptions:
    """Pretraining's options for a measured run of `args`' shape and data (plus `fields`)."""
    return pretrain.PretrainOptions(
        data=args.data,
        cache_dir=args.cache_dir,
        model=args.preset,
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        out=out,
        no_progress=True,
        **fields,
    )


def pipeline_tokens_per_s(args: argparse.Namespace, tokenizer_dir: Path, work: Path, round_: int) -> float:
    """Median tokens/s over pretrain.py's logging windows (each covers everything the loop does between logs)."""
    out = work / f"run-{round_}"
    pretrain.train(
        run_options(
            args,
            out,
            tokenizer=str(tokenizer_dir),
            batch_size=args.batch,
            max_steps=args.steps + 5,
            log_every=5,
            eval_every=100000,
            save_every=100000,
            eval_blocks=4,
            sample_tokens=1,
            compile=args.compile,
        )
    )
    windows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [w["tokens_per_s"] for w in windows if "tokens_per_s" in w][1:]  # the first window includes warmup
    return statistics.median(rates)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # the same allocator settings for every model measured
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Train the tokenizer once (a one-off cost, not a per-step one), then reuse it in every run.
        setup = dict(max_steps=1, batch_size=2, eval_blocks=2, sample_tokens=1)
        pretrain.train(run_options(args, work / "setup", **setup))
        tokenizer_dir = work / "setup" / "tokenizer"
        config = TinyConfig.from_preset(
            args.preset, vocab_size=json.loads((work / "setup" / "model" / "config.json").read_text())["vocab_size"]
        )
        bare, piped = [], []
        for round_ in range(args.rounds):
            bare.append(bare_tokens_per_s(config, args, device))
            piped.append(pipeline_tokens_per_s(args, tokenizer_dir, work, round_))
            print(f"round {round_ + 1}: bare {bare[-1]:,.0f} tokens/s, pipeline {piped[-1]:,.0f} tokens/s")
    bare_tps, pipe_tps = statistics.median(bare), statistics.median(piped)
    ratio = pipe_tps / bare_tps
    figures = {
        "setup": {
            "preset": args.preset,
            "batch": args.batch,
            "block_size": args.block_size,
            "steps": args.steps,
            "rounds": args.rounds,
            "device": device.type,
            "compile": args.compile,
        },
        "bare_tokens_per_s": round(bare_tps, 1),
        "pipeline_tokens_per_s": round(pipe_tps, 1),
        "pipeline_vs_bare": round(ratio, 3),
        "goal": "pipeline_vs_bare >= 0.90",
    }
    table = "\n".join(
        [
            f"End-to-end pretraining throughput, {args.preset}, batch {args.batch} x {args.block_size}, {device.type};"
            f" median over {args.rounds} alternating rounds of {args.steps} steps.",
            "",
            "| measurement | tokens/s |",
            "|---|---:|",
            f"| bare model step (forward, loss, backward, clip, AdamW) | {bare_tps:,.0f} |",
            f"| training/pretrain.py (data, curriculum, guard, logging included) | {pipe_tps:,.0f} |",
            f"| pipeline / bare | {ratio:.3f}x (goal >= 0.90) |",
        ]
    )
    name = args.name or f"train_speed_{device.type}"
    write_results(name, figures, table, args.out)
    print(table)
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
