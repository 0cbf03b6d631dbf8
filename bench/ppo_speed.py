"""Speed inside PPO: rollouts through tiny_hf's engine vs transformers' `generate()`, and where a PPO step's time goes.

1. Rollouts: the same batch of verifiable-task prompts sampled (temperature 0.7, up to `--new-tokens`, stopping at
   the end-of-turn token) by `alignment/ppo.py`'s `generate_responses`, once through the engine (continuous
   batching, a seed per request) and once through `generate()` (one left-padded batch), timed round-robin; tokens/s
   counts the response tokens each actually produced.
2. The step split: a short real PPO run (`alignment/ppo.main`) and the median seconds of rollout, scoring and update
   from its metrics.jsonl.

    tiny-hf bench ppo-speed --model runs/sft          # the SFT run PPO starts from (or a random tiny-3m)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tiny_hf  # noqa: F401 (registers the Auto classes)
from alignment import ppo
from tiny_hf.results import RESULTS_DIR, write_results
from tiny_hf.runs import resolve_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/sft", help="a run or model folder with a chat template")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per rollout batch")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=4, help="steps of the real PPO run for the time split")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def rollout_speed(args: argparse.Namespace, path: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    stop = ppo.stop_token_id(tokenizer, None)
    rows = ppo.load_prompts("verifiable", None)[: args.batch_size]
    prompts = [
        tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        for r in rows
    ]
    engine = ppo.make_engine(policy, tokenizer, args.batch_size)
    seeds = list(range(len(prompts)))
    settings = dict(max_new_tokens=args.new_tokens, temperature=0.7, stop_id=stop, seeds=seeds)
    runs = {"generate": None, "engine": engine}
    for engine_or_none in runs.values():  # warm up
        ppo.generate_responses(policy, tokenizer, prompts, engine=engine_or_none, **settings)
    rates = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, engine_or_none in runs.items():
            start = time.perf_counter()
            responses = ppo.generate_responses(policy, tokenizer, prompts, engine=engine_or_none, **settings)
            rates[name].append(sum(len(r) for r in responses) / (time.perf_counter() - start))
    tps = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "generate_tokens_per_s": tps["generate"],
        "engine_tokens_per_s": tps["engine"],
        "speedup": tps["engine"] / tps["generate"],
    }


def step_split(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ppo.train(
            ppo.PPOOptions(
                model=args.model,
                reward_fn=["exact_match"],
                task="verifiable",
                out=Path(tmp),
                max_steps=args.ppo_steps,
                batch_size=args.batch_size,
                max_new_tokens=args.new_tokens,
                no_progress=True,
                save_every=10**6,
            )
        )
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return {key: statistics.median(r[key] for r in records) for key in ppo.TIMING_KEYS}


def main(argv=None) -> dict:
    args = parse_args(argv)
    path, _ = resolve_model(args.model)
    figures = {
        "model": args.model,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "rollouts": rollout_speed(args, path),
        "step_split_s": step_split(args),
    }
    r, split = figures["rollouts"], figures["step_split_s"]
    total = sum(split.values())
    table = (
        f"PPO on `{args.model}`, {args.batch_size} prompts per batch, up to {args.new_tokens} new tokens, CPU.\n\n"
        "| rollouts | `generate()` (one padded batch) | engine | ratio |\n|---|---:|---:|---:|\n"
        f"| response tokens/s | {r['generate_tokens_per_s']:,.0f} | {r['engine_tokens_per_s']:,.0f} | "
        f"**{r['speedup']:.1f}x** |\n\n"
        f"One PPO step (median of {args.ppo_steps}): {total:.2f} s = rollout {split['rollout_s']:.2f} s "
        f"({split['rollout_s'] / total:.0%}), scoring {split['scoring_s']:.2f} s ({split['scoring_s'] / total:.0%}), "
        f"update {split['update_s']:.2f} s ({split['update_s'] / total:.0%}).\n"
    )
    write_results("ppo_speed_cpu", figures, table, args.out)
    print(table)
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
