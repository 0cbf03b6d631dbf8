"""Serving speed: the tiny_hf engine vs transformers' `generate()` on the same weights, in one process.

1. Batch-1 decode: one prompt, greedy, a fixed number of new tokens (eos ignored): tokens/s of `generate()` and of
   the engine. Timed alternately, median of `--repeats`.
2. Throughput: N requests of mixed prompt and output lengths (16 and 64 by default), all submitted to the engine at
   once (continuous batching) vs the same requests one by one through `generate()`: generated tokens/s.
3. Under load, through the real HTTP server and the official `openai` client (streaming): 64 requests, 16 at a time;
   time to first token and request latency, p50 and p99.

    tiny-hf bench serve-speed                                  # CPU, the tiny-3m preset (the demo's model)
    tiny-hf bench serve-speed --model runs/demo                # a trained run folder
    tiny-hf bench serve-speed --device cuda --preset gpt2-small --dtype bf16

Quote the ratios: absolute figures hold only for the machine in the results file.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tiny_hf import TinyConfig, TinyForCausalLM
from tiny_hf.engine import Engine, EngineLoop, SamplingParams
from tiny_hf.results import RESULTS_DIR, percentiles, write_results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help="a run or model folder (default: random --preset weights)")
    model.add_argument("--preset", default="tiny-3m")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    work = parser.add_argument_group("workload")
    work.add_argument("--prompt-len", type=int, default=32, help="batch-1 prompt length")
    work.add_argument("--new-tokens", type=int, default=128, help="batch-1 tokens generated")
    work.add_argument("--repeats", type=int, default=3)
    work.add_argument("--concurrency", default="16,64", help="request counts for the throughput comparison")
    work.add_argument("--load-requests", type=int, default=64)
    work.add_argument("--load-parallel", type=int, default=16)
    work.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS_DIR)
    out.add_argument("--name", default=None, help="results file stem (default: serve_speed_<device>)")
    return parser.parse_args(argv)


def load_model(args) -> tuple[torch.nn.Module, object]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device != "cpu" else "fp32")]
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tiny_hf.runs import resolve_model

        path, _ = resolve_model(args.model)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(args.device).eval(), AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    config = TinyConfig.from_preset(
        args.preset, max_position_embeddings=max(512, TinyConfig.from_preset(args.preset).max_position_embeddings)
    )
    return TinyForCausalLM(config).to(device=args.device, dtype=dtype).eval(), None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # eos ignored: exactly new_tokens, as the engine's ignore_eos
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


def workload(n: int, vocab: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """n requests: prompts of 16-128 tokens, 32-128 new tokens."""
    return [([rng.randrange(5, vocab) for _ in range(rng.randint(16, 128))], rng.randint(32, 128)) for _ in range(n)]


def batch1(model, engines: dict, args, rng) -> dict:
    """Batch-1 greedy tokens/s of generate() and of each engine, timed round-robin; median of --repeats."""
    prompt = [rng.randrange(5, model.config.vocab_size) for _ in range(args.prompt_len)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    hf_generate(model, prompt, 4)
    for engine in engines.values():  # warm up (and, for the compiled engine, compile)
        engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
    times = {"generate": [], **{name: [] for name in engines}}
    for _ in range(args.repeats):
        for name in times:
            sync(args.device)
            start = time.perf_counter()
            if name == "generate":
                hf_generate(model, prompt, args.new_tokens)
            else:
                engines[name].generate([prompt], params)
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    tps = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    return {
        "generate_tokens_per_s": tps["generate"],
        **{f"{name}_tokens_per_s": tps[name] for name in engines},
        **{f"{name}_speedup": tps[name] / tps["generate"] for name in engines},
    }


def throughput(model, engine, n: int, args, rng) -> dict:
    requests = workload(n, model.config.vocab_size, rng)
    total = sum(new for _, new in requests)
    sync(args.device)
    start = time.perf_counter()
    for prompt, new in requests:
        hf_generate(model, prompt, new)
    sync(args.device)
    hf_time = time.perf_counter() - start
    params = [SamplingParams(max_tokens=new, temperature=0, ignore_eos=True) for _, new in requests]
    start = time.perf_counter()
    results = engine.generate([p for p, _ in requests], params)
    sync(args.device)
    engine_time = time.perf_counter() - start
    assert sum(len(r.token_ids) for r in results) == total
    return {
        "requests": n,
        "generated_tokens": total,
        "generate_one_by_one_tokens_per_s": total / hf_time,
        "engine_tokens_per_s": total / engine_time,
        "speedup": hf_time / engine_time,
    }


def under_load(model, tokenizer, args, rng) -> dict:
    """The live server (uvicorn in a thread) and the openai client, streaming."""
    import openai
    import uvicorn

    from app.server import build_app

    if tokenizer is None:
        from tiny_hf.bpe import train_tokenizer
        from tiny_hf.corpus import topic_documents

        tokenizer = train_tokenizer([d["text"] for d in topic_documents()], vocab_size=model.config.vocab_size)
    engine = Engine(model, tokenizer, max_batch_size=args.load_parallel, max_seq_len=512)
    loop = EngineLoop(engine).start()
    server = uvicorn.Server(
        uvicorn.Config(build_app(loop, model_name="bench"), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    words = tokenizer.decode([rng.randrange(5, len(tokenizer)) for _ in range(4000)]).split()
    jobs = [
        (" ".join(rng.choices(words, k=rng.randint(10, 60))), rng.randint(32, 128)) for _ in range(args.load_requests)
    ]

    def run(job):
        prompt, new = job
        start = time.perf_counter()
        first = None
        stream = client.completions.create(
            model="bench", prompt=prompt, max_tokens=new, temperature=0.8, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = 0
        for _ in stream:
            first = first or time.perf_counter()
            chunks += 1
        return first - start, time.perf_counter() - start, new

    start = time.perf_counter()
    with ThreadPoolExecutor(args.load_parallel) as pool:
        results = list(pool.map(run, jobs))
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=30)

    ttft, latency = percentiles([r[0] for r in results]), percentiles([r[1] for r in results])
    return {
        "requests": len(jobs),
        "parallel": args.load_parallel,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50_s": ttft["p50"],
        "ttft_p99_s": ttft["p99"],
        "latency_p50_s": latency["p50"],
        "latency_p99_s": latency["p99"],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    model, tokenizer = load_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {params / 1e6:.1f}M parameters on {args.device}")
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    engine = Engine(model, tokenizer, max_batch_size=max(concurrency), max_seq_len=512)

    figures = {"model": args.model or args.preset, "parameters": params, "device": args.device}
    compiled = Engine(model, tokenizer, max_batch_size=1, max_seq_len=512, compile=True)
    figures["batch1"] = batch1(model, {"engine": engine, "engine_compiled": compiled}, args, rng)
    print(f"batch 1: {figures['batch1']}")
    figures["throughput"] = [throughput(model, engine, n, args, rng) for n in concurrency]
    print(f"throughput: {figures['throughput']}")
    figures["load"] = under_load(model, tokenizer, args, rng)
    print(f"under load: {figures['load']}")

    b1, load = figures["batch1"], figures["load"]
    rows = [
        f"| batch 1 decode ({args.prompt_len}-token prompt, {args.new_tokens} new) | "
        f"{b1['generate_tokens_per_s']:,.0f} | {b1['engine_tokens_per_s']:,.0f} | **{b1['engine_speedup']:.1f}x** |",
        f"| batch 1 decode, engine with `compile=True` (inductor, C++ wrapper on CPU) | "
        f"{b1['generate_tokens_per_s']:,.0f} | {b1['engine_compiled_tokens_per_s']:,.0f} | "
        f"**{b1['engine_compiled_speedup']:.1f}x** |",
    ]
    for t in figures["throughput"]:
        rows.append(
            f"| {t['requests']} requests, mixed lengths (generate one by one vs engine) | "
            f"{t['generate_one_by_one_tokens_per_s']:,.0f} | {t['engine_tokens_per_s']:,.0f} | "
            f"**{t['speedup']:.1f}x** |"
        )
    table = (
        f"Serving speed, {figures['model']} ({params / 1e6:.1f}M parameters), {args.device}, generated tokens/s\n\n"
        "| workload | `generate()` | engine | ratio |\n|---|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"Under load (HTTP server + openai client, streaming, {load['requests']} requests, {load['parallel']} at a "
        f"time): {load['tokens_per_s']:,.0f} tokens/s; time to first token p50 {load['ttft_p50_s'] * 1000:.0f} ms, "
        f"p99 {load['ttft_p99_s'] * 1000:.0f} ms; latency p50 {load['latency_p50_s']:.2f} s, "
        f"p99 {load['latency_p99_s']:.2f} s.\n"
    )
    write_results(args.name or f"serve_speed_{args.device.split(':')[0]}", figures, table, args.out)
    print(table)
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
