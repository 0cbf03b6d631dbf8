"""Our engine against llama.cpp (llama-cpp-python) on the same weights, same precision (f32), same threads.

One process, alternating rounds (the order flips every round, so drift in the machine's speed hits every system
alike); each round takes fresh prompts (windows of the pydoc topics at random offsets, in the model's tokens), the
same for every system, so no prefix cache helps anyone.

1. Batch 1: a `--prompt-len` prompt and `--new-tokens` greedy tokens (eos ignored). Time to first token (the
   prefill plus one sampling step) and decode tokens/s after it ((new - 1) tokens over the time from the first token
   to the last), for the engine (eager and `compile=True`), transformers' `generate()` (the reference) and llama.cpp
   on an f32 GGUF (f16/q8_0 too with `--gguf-dtypes`, for reference: we have no engine at those precisions).
2. Concurrency: `--concurrent` requests (mixed lengths by default), all submitted to the engine at once vs llama.cpp
   serving them one after another (a request's time to first token includes its wait): generated tokens/s and the
   median time to first token.
3. Greedy agreement: the engine's tokens against llama.cpp f32's on the first round's prompt.
4. `--profile`: torch.profiler on a few eager engine decode steps, time split into matmul, attention, other model
   ops, sampling, engine bookkeeping and Python, with what would close the gap.

    tiny-hf bench engine-vs-llamacpp                                  # the demo's shape (tiny-3m), random weights
    tiny-hf bench engine-vs-llamacpp --model runs/demo                # the trained demo model
    tiny-hf bench engine-vs-llamacpp --model runs/smollm2 --profile   # SmolLM2-135M-Instruct (tiny-hf fetch smollm2)

The results file keeps one section per model (`--label`), so both runs land in one table. Speed in fp32 does not
depend on the weights' values, so random weights time the same as trained ones. Quote the ratios: absolute figures
hold only for the machine in the results file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import tiny_hf
from tiny_hf import TinyConfig, TinyForCausalLM
from tiny_hf.engine import Engine, SamplingParams
from tiny_hf.results import RESULTS_DIR, spread, write_results

# issue 19's goals: batch-1 decode speed vs llama.cpp (a stock Llama such as SmolLM2 / our own models), and
# engine tokens/s with every request at once vs llama.cpp serving them one after another
GOAL_BATCH1 = {"llama": 1.0, "tiny": 0.7}
GOAL_CONCURRENT = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=None, help="a run or model folder, ours or a stock Llama (default: --preset)"
    )
    model.add_argument("--preset", default="tiny-3m", help="random weights of this shape when no --model")
    model.add_argument("--label", default=None, help="the model's name in the results (default: run folder/preset)")
    model.add_argument(
        "--gguf-dir", type=Path, default=None, help="where GGUFs go (default: RUN/gguf; temp for presets)"
    )
    model.add_argument("--gguf-dtypes", default="f32", help="llama.cpp precisions, f32 first (also f16, q8_0)")
    model.add_argument("--extra-bufts", action="store_true", help="let llama.cpp repack weights (crashes when tiny)")
    work = parser.add_argument_group("workload")
    work.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for torch and llama.cpp alike")
    work.add_argument("--rounds", type=int, default=5)
    work.add_argument("--prompt-len", type=int, default=32, help="batch-1 prompt length")
    work.add_argument("--new-tokens", type=int, default=128, help="batch-1 tokens generated (>= 2)")
    work.add_argument("--concurrent", type=int, default=16, help="requests at once (0: skip)")
    work.add_argument(
        "--lengths", choices=["mixed", "fixed"], default="mixed", help="mixed: prompts 16-128, 32-128 new"
    )
    work.add_argument("--max-seq-len", type=int, default=256, help="engine window and llama.cpp n_ctx")
    work.add_argument("--no-compile", action="store_true", help="skip the engine with compile=True")
    work.add_argument(
        "--decode-steps",
        type=int,
        default=8,
        help="also time the compiled engine with this many greedy steps per call",
    )
    work.add_argument("--no-generate", action="store_true", help="skip transformers' generate()")
    work.add_argument(
        "--compiled-concurrent", action="store_true", help="also serve the requests compiled (slow start)"
    )
    work.add_argument(
        "--goal", type=float, default=None, help="batch-1 decode goal (default: 1.0 stock Llama, 0.7 ours)"
    )
    work.add_argument("--seed", type=int, default=0)
    prof = parser.add_argument_group("profile")
    prof.add_argument("--profile", action="store_true", help="split an eager engine decode step by operator")
    prof.add_argument("--profile-steps", type=int, default=16)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS_DIR)
    out.add_argument("--name", default="engine_vs_llamacpp_cpu", help="results file stem")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: decode speed needs at least 2")
    longest = max(args.prompt_len + args.new_tokens, 256 if args.lengths == "mixed" and args.concurrent else 0)
    if longest > args.max_seq_len:
        parser.error(f"--max-seq-len {args.max_seq_len}: the longest request needs {longest} (mixed lengths: 256)")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# The models: ours for the engine, its stock Llama twin for transformers' generate() and the GGUF
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Models:
    label: str
    engine_model: torch.nn.Module | None  # None: the engine cannot run this model (a note says why)
    llama: torch.nn.Module  # a transformers LlamaForCausalLM with the same weights
    tokenizer: object
    folder: Path | None  # the model folder, None for random weights
    notes: list[str]
    stock_llama: bool = False  # loaded from a stock Llama folder (SmolLM2): the batch-1 goal is 1.0x


def load_models(args) -> Models:
    if args.model:
        return load_folder(args)
    from tiny_hf.bpe import train_tokenizer
    from tiny_hf.corpus import topic_documents

    torch.manual_seed(args.seed)
    config = TinyConfig.from_preset(args.preset)
    config.max_position_embeddings = max(config.max_position_embeddings, args.max_seq_len)
    model = TinyForCausalLM(config).eval()
    tokenizer = train_tokenizer([d["text"] for d in topic_documents()], vocab_size=config.vocab_size)
    note = f"{args.preset} with random weights: fp32 speed does not depend on the weights' values"
    return Models(args.label or args.preset, model, tiny_hf.to_llama(model), tokenizer, None, [note])


def load_folder(args) -> Models:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_hf.runs import resolve_model

    path, folders = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    label = args.label or (folders[0].name if folders else Path(path).name)
    if model.config.model_type != "llama":
        return Models(label, model, tiny_hf.to_llama(model), tokenizer, Path(path), [])
    if not hasattr(tiny_hf, "from_llama"):
        note = "engine skipped: this tiny_hf has no `from_llama` to turn a stock Llama into a TinyForCausalLM"
        return Models(label, None, model, tokenizer, Path(path), [note], stock_llama=True)
    return Models(label, tiny_hf.from_llama(model).eval(), model, tokenizer, Path(path), [], stock_llama=True)


def gguf_files(models: Models, dtypes: list[str], folder: Path) -> dict[str, Path]:
    """The model as GGUF files (the project's writer, as `tiny-hf export --format gguf`), reused when newer than
    the model folder's weights."""
    from tiny_hf.chat import end_of_turn_ids
    from training.to_gguf import write_gguf

    files = {}
    for dtype in dtypes:
        path = folder / f"{models.label}.{dtype}.gguf"
        weights = [p.stat().st_mtime for p in (models.folder or folder).glob("*.safetensors")]
        if not (path.is_file() and models.folder and path.stat().st_mtime > max(weights, default=0)):
            tokenizer = models.tokenizer
            eos = end_of_turn_ids(tokenizer) if tokenizer.chat_template else None
            print(f"writing {path}")
            write_gguf(models.llama, tokenizer, path, dtype, eos_ids=eos)
        files[dtype] = path
    return files


@contextlib.contextmanager
def plain_buffers(enabled: bool = True):
    """llama.cpp 0.3.36's repacked CPU buffers (llama.cpp's extra buffer types) crash on small matrices: load into
    plain ones (`--no-extra-bufts`), as tests/test_export.py does."""
    import llama_cpp.llama_cpp as api

    defaults = api.llama_model_default_params
    if not enabled:
        yield
        return

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    api.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_model_default_params = defaults


def open_llama_cpp(path: Path, args):
    from llama_cpp import Llama

    with plain_buffers(not args.extra_bufts):
        return Llama(
            model_path=str(path),
            n_ctx=args.max_seq_len,
            n_batch=args.max_seq_len,  # a whole prompt in one batch
            n_ubatch=args.max_seq_len,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
        )


# ---------------------------------------------------------------------------------------------------------------------
# One timed run of each system: (time to first token, time from the first token to the last, the tokens)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    ttft: float
    decode: float
    tokens: list[int]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run_engine(engine: Engine, prompt: list[int], n: int) -> Run:
    start, first, tokens = time.perf_counter(), None, []
    for out in engine.stream(prompt, greedy(n)):
        tokens += out.token_ids
        first = first or (time.perf_counter() if tokens else None)
    end = time.perf_counter()
    return Run(first - start, end - first, tokens)


def run_generate(model, prompt: list[int], n: int) -> Run:
    from transformers.generation.streamers import BaseStreamer

    class Times(BaseStreamer):  # put() gets the prompt first, then each new token
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(time.perf_counter())

        def end(self):
            pass

    times, ids = Times(), torch.tensor([prompt])
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,  # eos ignored: exactly n, as the engine's ignore_eos
        do_sample=False,
        repetition_penalty=1.0,  # a chat folder's generation config has 1.1: greedy here, as every other system
        pad_token_id=model.config.pad_token_id,
        streamer=times,
    )
    first, end = times.calls[1], times.calls[-1]
    return Run(first - start, end - first, out[0, len(prompt) :].tolist())


def run_llama_cpp(llm, prompt: list[int], n: int) -> Run:
    """`Llama.generate` never stops at eos (top_k=1, temp=0: greedy): break after n tokens."""
    llm.reset()
    start, first, tokens = time.perf_counter(), None, []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        tokens.append(token)
        first = first or time.perf_counter()
        if len(tokens) == n:
            break
    end = time.perf_counter()
    return Run(first - start, end - first, tokens)


def batch1_systems(models: Models, llms: dict, args) -> dict:
    """name -> run(prompt, n) for every system timed at batch 1."""
    systems = {}
    if models.engine_model is not None:
        eager = Engine(models.engine_model, models.tokenizer, max_batch_size=1, max_seq_len=args.max_seq_len)
        systems["engine"] = lambda p, n: run_engine(eager, p, n)
        if not args.no_compile:
            compiled = Engine(
                models.engine_model, models.tokenizer, max_batch_size=1, max_seq_len=args.max_seq_len, compile=True
            )
            systems["engine_compiled"] = lambda p, n: run_engine(compiled, p, n)
            if args.decode_steps > 1:
                multi = Engine(
                    models.engine_model,
                    models.tokenizer,
                    max_batch_size=1,
                    max_seq_len=args.max_seq_len,
                    compile=True,
                    decode_steps=args.decode_steps,
                )
                systems[f"engine_compiled_steps{args.decode_steps}"] = lambda p, n: run_engine(multi, p, n)
    if not args.no_generate:
        hf = models.llama if models.stock_llama or models.engine_model is None else models.engine_model
        systems["generate"] = lambda p, n: run_generate(hf, p, n)
    for dtype, llm in llms.items():
        systems[f"llama_cpp_{dtype}"] = lambda p, n, llm=llm: run_llama_cpp(llm, p, n)
    return systems


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------
def ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Round by round: ours / theirs (the same round, so the machine's drift cancels)."""
    return [a / b for a, b in zip(ours, theirs, strict=True)]


def text_tokens(tokenizer) -> list[int]:
    """The pydoc topics as the model's tokens: prompts are windows of real text, so a trained model's greedy
    choices are clear-cut and agreement with llama.cpp means something."""
    from tiny_hf.corpus import topic_documents

    return tokenizer("\n\n".join(d["text"] for d in topic_documents()), verbose=False).input_ids


def random_prompt(rng: random.Random, length: int, text: list[int]) -> list[int]:
    start = rng.randrange(len(text) - length)
    return text[start : start + length]


def ordered(names: list[str], round_index: int) -> list[str]:
    return names if round_index % 2 == 0 else names[::-1]


def batch1(systems: dict, args, text: list[int], rng: random.Random) -> tuple[dict, dict]:
    """Per system: time to first token (ms) and decode tokens/s over the rounds; and each system's tokens on the
    first round's prompt."""
    warm = random_prompt(rng, args.prompt_len, text)
    for run in systems.values():  # warm up (and compile)
        run(warm, 4)
    ttft, decode, first_tokens = {n: [] for n in systems}, {n: [] for n in systems}, {}
    for r in range(args.rounds):
        prompt = random_prompt(rng, args.prompt_len, text)
        for name in ordered(list(systems), r):
            result = systems[name](prompt, args.new_tokens)
            ttft[name].append(result.ttft * 1000)
            decode[name].append((args.new_tokens - 1) / result.decode)
            first_tokens.setdefault(name, result.tokens)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {decode[n][-1]:,.0f} tok/s" for n in systems))
    figures = {n: {"ttft_ms": spread(ttft[n]), "decode_tokens_per_s": spread(decode[n])} for n in systems}
    for name in systems:  # per-round ratios to llama.cpp at the same precision (f32 for ours)
        peer = "llama_cpp_f32" if not name.startswith("llama_cpp") else None
        if peer and peer in systems:
            figures[name]["decode_vs_llama_cpp"] = spread(ratios(decode[name], decode[peer]))
            figures[name]["prefill_vs_llama_cpp"] = spread(ratios(ttft[peer], ttft[name]))
    return figures, first_tokens


def workload(args, text: list[int], rng: random.Random) -> list[tuple[list[int], int]]:
    if args.lengths == "fixed":
        return [(random_prompt(rng, args.prompt_len, text), args.new_tokens) for _ in range(args.concurrent)]
    return [(random_prompt(rng, rng.randint(16, 128), text), rng.randint(32, 128)) for _ in range(args.concurrent)]


def serve_engine(engine: Engine, requests: list) -> tuple[float, list[float]]:
    """All requests at once: (seconds until all finished, each request's time to first token)."""
    start, first = time.perf_counter(), {}
    ids = [engine.add_request(prompt, greedy(n)) for prompt, n in requests]
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
    return time.perf_counter() - start, [first[i] for i in ids]


def serve_llama_cpp(llm, requests: list) -> tuple[float, list[float]]:
    """One request after another: a request's time to first token includes its wait for the ones before it."""
    start, first = time.perf_counter(), []
    for prompt, n in requests:
        wait = time.perf_counter() - start
        first.append(wait + run_llama_cpp(llm, prompt, n).ttft)
    return time.perf_counter() - start, first


def concurrent(models: Models, llm, args, text: list[int], rng: random.Random) -> dict:
    """Engine tokens/s with every request submitted at once vs llama.cpp f32 one after another."""
    servers = {}
    for name, compile in (("engine", False), ("engine_compiled", True)):
        if models.engine_model is None or (compile and not args.compiled_concurrent):
            continue
        engine = Engine(
            models.engine_model,
            models.tokenizer,
            max_batch_size=args.concurrent,
            max_seq_len=args.max_seq_len,
            compile=compile,
        )
        servers[name] = lambda reqs, e=engine: serve_engine(e, reqs)
    servers["llama_cpp_f32"] = lambda reqs: serve_llama_cpp(llm, reqs)
    warm = [(prompt, min(n, 8)) for prompt, n in workload(args, text, rng)]
    for serve in servers.values():  # warm up (and compile the padded batch sizes)
        serve(warm)
    tps, ttft = {n: [] for n in servers}, {n: [] for n in servers}
    for r in range(args.rounds):
        requests = workload(args, text, rng)
        total = sum(n for _, n in requests)
        for name in ordered(list(servers), r):
            seconds, firsts = servers[name](requests)
            tps[name].append(total / seconds)
            ttft[name].append(statistics.median(firsts) * 1000)
        print(f"concurrent round {r + 1}: " + ", ".join(f"{n} {tps[n][-1]:,.0f} tok/s" for n in servers))
    figures = {"requests": args.concurrent, "lengths": args.lengths}
    for name in servers:
        figures[name] = {"tokens_per_s": spread(tps[name]), "median_ttft_ms": spread(ttft[name])}
        if name != "llama_cpp_f32":
            figures[name]["vs_llama_cpp"] = spread(ratios(tps[name], tps["llama_cpp_f32"]))
    return figures


def agreement(first_tokens: dict) -> dict:
    """Each of our systems' greedy tokens against llama.cpp f32's on the same prompt."""
    peer = first_tokens.get("llama_cpp_f32")
    if peer is None:
        return {}
    result = {}
    for name, tokens in first_tokens.items():
        if name.startswith("llama_cpp"):
            continue
        differ = next((i for i, (a, b) in enumerate(zip(tokens, peer, strict=True)) if a != b), None)
        result[name] = {
            "same": sum(a == b for a, b in zip(tokens, peer, strict=True)),
            "of": len(peer),
            "first_difference": differ,
        }
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Profile: where an eager engine decode step spends its time
# ---------------------------------------------------------------------------------------------------------------------
SAMPLING_OPS = ("aten::argmax", "aten::softmax", "aten::_softmax", "aten::topk", "aten::multinomial", "aten::sort")
CLOSE_IT = {
    "matmul": "memory-bound weight reads: fuse q/k/v and gate/up into one matmul each, or read the weights once per "
    "step in lower precision (bf16/int8 kernels, as llama.cpp's q8_0)",
    "attention": "fewer small ops around SDPA (RoPE, cache writes, transposes); the static step of compile=True "
    "attends over the whole --max-seq-len window: the written keys only would do",
    "other model ops": "fuse RMSNorm and SwiGLU (compile=True does), drop residual copies",
    "sampling": "argmax on the last position only, without the fp32 copy of the logits",
    "engine bookkeeping": "build masks and positions once per step on the device, not per layer",
    "python and framework overhead": "compile=True (the C++ wrapper runs a step without Python between kernels) or "
    "fewer, larger ops per layer",
}


def profile_decode(models: Models, args, text: list[int], rng: random.Random) -> dict:
    """torch.profiler over `--profile-steps` eager decode steps; module hooks open named ranges so each operator's
    self time is charged to the linear layers, the attention, the rest of the model, or the engine outside it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    engine = Engine(models.engine_model, models.tokenizer, max_batch_size=1, max_seq_len=args.max_seq_len)
    ranges, handles = [], []

    def enter(name):
        def hook(*_):
            ranges.append(record_function(name))
            ranges[-1].__enter__()

        return hook

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    for name, module in models.engine_model.named_modules():
        kind = "linear" if isinstance(module, torch.nn.Linear) else None
        kind = kind or ("attention" if name.endswith("self_attn") else None)
        kind = kind or ("model" if name.endswith(("embed_tokens", "norm")) or name.count(".") == 2 else None)
        if kind and name:
            handles += [module.register_forward_pre_hook(enter(f"bench::{kind}")), module.register_forward_hook(leave)]
    stream = engine.stream(random_prompt(rng, args.prompt_len, text), greedy(args.profile_steps + 4))
    try:
        next(stream)  # the prefill
        next(stream)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.profile_steps):
                next(stream)
            wall = time.perf_counter() - start
        stream.close()
    finally:
        for handle in handles:
            handle.remove()
    return split_profile(prof.events(), wall, args.profile_steps)


def category(event) -> str:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("bench::"):
        parent = parent.cpu_parent
    where = parent.name.removeprefix("bench::") if parent else None
    if where is None:
        return "sampling" if event.name in SAMPLING_OPS else "engine bookkeeping"
    return {"linear": "matmul", "attention": "attention", "model": "other model ops"}[where]


def split_profile(events, wall: float, steps: int) -> dict:
    shares, ops = dict.fromkeys(CLOSE_IT, 0.0), {}
    for event in events:
        if event.name.startswith("bench::"):
            continue
        seconds = event.self_cpu_time_total / 1e6
        shares[category(event)] += seconds
        ops[event.name] = ops.get(event.name, 0.0) + seconds
    shares["python and framework overhead"] = max(wall - sum(shares.values()), 0.0)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:10]
    return {
        "steps": steps,
        "step_ms": wall / steps * 1000,
        "note": "eager engine under the profiler (which slows it); shares of the profiled wall time",
        "share": {k: v / wall for k, v in shares.items()},
        "top_operators": [{"name": k, "ms_per_step": v / steps * 1000, "share": v / wall} for k, v in top],
        "would_close_it": CLOSE_IT,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def cell(s: dict, fmt: str = ",.0f", suffix: str = "") -> str:
    return f"{s['median']:{fmt}}{suffix} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def goals(entry: dict) -> dict:
    b1, conc = entry["batch1"], entry.get("concurrent", {})
    best = max((b1[n] for n in b1 if n.startswith("engine")), default=None, key=decode_ratio)
    result = {}
    if best and "decode_vs_llama_cpp" in best:
        ratio = decode_ratio(best)
        result["batch1_decode"] = {"goal": entry["goal_batch1"], "ratio": ratio, "met": ratio >= entry["goal_batch1"]}
    served = [conc[n]["vs_llama_cpp"]["median"] for n in conc if n.startswith("engine")]
    if served:
        result["concurrent"] = {"goal": GOAL_CONCURRENT, "ratio": max(served), "met": max(served) >= GOAL_CONCURRENT}
    return result


def decode_ratio(system: dict) -> float:
    return system.get("decode_vs_llama_cpp", {}).get("median", 0.0)


def section(entry: dict) -> str:
    w = entry["workload"]
    lines = [
        f"### {entry['label']} ({entry['parameters'] / 1e6:.1f}M parameters, fp32, {w['threads']} threads, "
        f"{w['rounds']} rounds)",
        "",
        f"Batch 1, {w['prompt_len']}-token prompt, {w['new_tokens']} new tokens, greedy; median (min-max); ratios "
        "are ours / llama.cpp f32 per round (prefill: its time to first token over ours).",
        "",
        "| system | time to first token ms | decode tokens/s | prefill vs llama.cpp | decode vs llama.cpp |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in entry["batch1"].items():
        ratios = [cell(s[k], ".2f", "x") if k in s else "" for k in ("prefill_vs_llama_cpp", "decode_vs_llama_cpp")]
        lines.append(
            f"| {name} | {cell(s['ttft_ms'], ',.1f')} | {cell(s['decode_tokens_per_s'])} | {' | '.join(ratios)} |"
        )
    if conc := entry.get("concurrent"):
        lines += [
            "",
            f"{conc['requests']} requests ({conc['lengths']} lengths): ours all at once, llama.cpp f32 one after "
            "another.",
            "",
            "| system | generated tokens/s | median time to first token ms | vs llama.cpp |",
            "|---|---:|---:|---:|",
        ]
        for name in (n for n in conc if isinstance(conc[n], dict)):
            s = conc[name]
            ratio = cell(s["vs_llama_cpp"], ".2f", "x") if "vs_llama_cpp" in s else ""
            lines.append(f"| {name} | {cell(s['tokens_per_s'])} | {cell(s['median_ttft_ms'], ',.0f')} | {ratio} |")
    lines += ["", *goal_lines(entry), *agreement_lines(entry), *profile_lines(entry)]
    lines += [f"Note: {note}." for note in entry["notes"]]
    return "\n".join(lines)


def goal_lines(entry: dict) -> list[str]:
    requests = entry.get("concurrent", {}).get("requests")
    names = {"batch1_decode": "batch-1 decode", "concurrent": f"{requests} requests at once, tokens/s"}
    out = []
    for key, g in entry["goals"].items():
        verdict = "met" if g["met"] else "**missed**"
        out.append(f"Goal {names[key]} >= {g['goal']:g}x llama.cpp: {g['ratio']:.2f}x, {verdict}.")
    return out


def agreement_lines(entry: dict) -> list[str]:
    return [
        f"Greedy tokens, {name} vs llama.cpp f32 on the first prompt: {a['same']}/{a['of']} equal"
        + (f" (first difference at token {a['first_difference']})." if a["first_difference"] is not None else ".")
        for name, a in entry["greedy_agreement"].items()
    ]


def profile_lines(entry: dict) -> list[str]:
    if not (p := entry.get("profile")):
        return []
    shares = sorted(p["share"].items(), key=lambda kv: -kv[1])
    lines = ["", f"Eager decode step under the profiler ({p['step_ms']:.1f} ms/step, {p['steps']} steps):", ""]
    lines += ["| part | share | what would close it |", "|---|---:|---|"]
    lines += [f"| {k} | {v:.0%} | {p['would_close_it'][k]} |" for k, v in shares]
    top = ", ".join(f"{o['name']} {o['share']:.0%}" for o in p["top_operators"][:5])
    return [*lines, "", f"Top operators: {top}."]


def write(entry: dict, args) -> None:
    """Merge this model's entry into the results file (one section per model) and rewrite both files."""
    path = args.out / f"{args.name}.json"
    entries = json.loads(path.read_text()).get("models", {}) if path.is_file() else {}
    entries[entry["label"]] = entry
    table = "Our engine vs llama.cpp (llama-cpp-python), same weights, fp32/f32, CPU\n\n" + "\n\n".join(
        section(e) for e in entries.values()
    )
    write_results(args.name, {"models": entries}, table, args.out)
    print(table)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    models = load_models(args)
    text = text_tokens(models.tokenizer)
    params = sum(p.numel() for p in models.llama.parameters())
    print(f"{models.label}: {params / 1e6:.1f}M parameters, {args.threads} threads")
    with contextlib.ExitStack() as stack:
        folder = args.gguf_dir or (models.folder.parent / "gguf" if models.folder else None)
        folder = folder or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        dtypes = [d for d in args.gguf_dtypes.split(",") if d]
        files = gguf_files(models, dtypes, folder)
        llms = {dtype: open_llama_cpp(path, args) for dtype, path in files.items()}
        b1, first_tokens = batch1(batch1_systems(models, llms, args), args, text, rng)
        entry = {
            "label": models.label,
            "model": args.model or f"{args.preset} (random weights)",
            "parameters": params,
            "gguf": {d: str(p) for d, p in files.items()} if models.folder else {d: "(temporary)" for d in files},
            "workload": {
                k: getattr(args, k) for k in ("threads", "rounds", "prompt_len", "new_tokens", "max_seq_len")
            },
            "goal_batch1": args.goal or GOAL_BATCH1["llama" if models.stock_llama else "tiny"],
            "batch1": b1,
            "greedy_agreement": agreement(first_tokens),
            "notes": models.notes,
        }
        if args.concurrent and "f32" in llms:
            entry["concurrent"] = concurrent(models, llms["f32"], args, text, rng)
        if args.profile and models.engine_model is not None:
            entry["profile"] = profile_decode(models, args, text, rng)
        del llms
    entry["goals"] = goals(entry)
    write(entry, args)
    return entry


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
