"""Training-step speed: TinyForCausalLM vs transformers' LlamaForCausalLM and GPT2LMHeadModel of the same shape.

All models live in one process and are timed round-robin (model A, B, C, A, B, C, ...), so drift in the machine's
speed hits every model alike. One step = forward with labels, backward, AdamW step. Figures are tokens/s (batch x
sequence length / median step time); quote the ratios, absolute figures hold only for this machine.

    tiny-hf bench model-speed                                   # CPU, ~14M params, fp32
    tiny-hf bench model-speed --device cuda --preset gpt2-small --seq-len 1024 --batch 16 --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from tiny_hf import TinyConfig, TinyForCausalLM
from tiny_hf.convert import llama_config
from tiny_hf.results import RESULTS_DIR, write_results
from tiny_hf.system import keep_freed_memory

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of one H100 SXM


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("shape (ignored fields come from --preset)")
    shape.add_argument("--preset", default=None, help="a TinyConfig preset to take the shape from, e.g. gpt2-small")
    shape.add_argument("--layers", type=int, default=6)
    shape.add_argument("--hidden", type=int, default=384)
    shape.add_argument("--heads", type=int, default=6)
    shape.add_argument("--vocab", type=int, default=8192)
    shape.add_argument("--seq-len", type=int, default=256)
    shape.add_argument("--batch", type=int, default=8)
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 master weights")
    run.add_argument("--compile", action="store_true", help="torch.compile every model")
    run.add_argument("--steps", type=int, default=6, help="timed steps per model per round")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS_DIR)
    out.add_argument("--name", default=None, help="results file stem (default: model_speed_<device>)")
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """Ours in the Llama shape and in the GPT-2 shape, each with its transformers twin (same widths, same weights
    count), all with SDPA attention."""
    if args.preset:
        base = TinyConfig.from_preset(args.preset).to_dict()
        dims = dict(
            vocab_size=base["vocab_size"],
            hidden_size=base["hidden_size"],
            num_hidden_layers=base["num_hidden_layers"],
            num_attention_heads=base["num_attention_heads"],
        )
    else:
        dims = dict(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
        )
    common = dict(max_position_embeddings=max(1024, args.seq_len), attn_implementation="sdpa", **dims)
    llama_shaped = TinyConfig(**common)
    gpt2_shaped = TinyConfig(
        position_embedding="learned",
        norm="layernorm",
        mlp="gelu",
        attention_bias=True,
        mlp_bias=True,
        norm_eps=1e-5,
        **common,
    )
    gpt2_config = GPT2Config(
        vocab_size=dims["vocab_size"],
        n_positions=common["max_position_embeddings"],
        n_embd=dims["hidden_size"],
        n_layer=dims["num_hidden_layers"],
        n_head=dims["num_attention_heads"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=llama_shaped.bos_token_id,
        eos_token_id=llama_shaped.eos_token_id,
    )
    gpt2_config._attn_implementation = "sdpa"
    llama = llama_config(llama_shaped)
    llama._attn_implementation = "sdpa"
    return {
        "tiny (llama shape)": TinyForCausalLM(llama_shaped),
        "LlamaForCausalLM": LlamaForCausalLM(llama),
        "tiny (gpt2 shape)": TinyForCausalLM(gpt2_shaped),
        "GPT2LMHeadModel": GPT2LMHeadModel(gpt2_config),
    }


def flops_per_token(model: torch.nn.Module, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 N (matmuls, forward + backward) + 12 L d T (attention)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n -= model.get_input_embeddings().weight.numel()  # a lookup, not a matmul (the tied head is counted once)
    n += model.get_output_embeddings().weight.numel() if model.config.tie_word_embeddings else 0
    return 6 * n + 12 * layers * hidden * seq_len


def training_steps(models: dict, batch: torch.Tensor, args: argparse.Namespace) -> dict:
    """One closure per model: forward + backward + AdamW on `batch` (compiled and in bf16 when asked)."""
    device, steps = batch.device, {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        forward = torch.compile(model) if args.compile else model

        def step(model=model, forward=forward, optimizer=optimizer):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    return steps


def time_rounds(steps: dict, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each model: warm-up, then `--rounds` rounds in which every model runs `--steps`."""

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        for name, step in steps.items():
            times[name] += [timed(step) for _ in range(args.steps)]
        print(
            f"round {round_ + 1}/{args.rounds}: "
            + ", ".join(f"{n} {statistics.median(t) * 1e3:.0f} ms" for n, t in times.items())
        )
    return times


def model_rows(models: dict, times: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """tokens/s, parameters, median step and (on a GPU) MFU per model."""
    tokens, cfg, rows = args.batch * args.seq_len, next(iter(models.values())).config, {}
    for name, model in models.items():
        tps = tokens / statistics.median(times[name])
        rows[name] = {
            "tokens_per_s": round(tps, 1),
            "params": sum(p.numel() for p in model.parameters()),
            "step_ms_median": round(statistics.median(times[name]) * 1e3, 2),
        }
        if device.type == "cuda":
            fpt = flops_per_token(model, cfg.num_hidden_layers, cfg.hidden_size, args.seq_len)
            rows[name]["mfu_vs_989_tflops"] = round(tps * fpt / H100_BF16_PEAK_FLOPS, 4)
    return rows


def speed_ratios(rows: dict) -> dict:
    ours = "tiny (llama shape)"
    faster_peer = max(("LlamaForCausalLM", "GPT2LMHeadModel"), key=lambda n: rows[n]["tokens_per_s"])
    ratios = {
        "tiny_llama_vs_LlamaForCausalLM": rows[ours]["tokens_per_s"] / rows["LlamaForCausalLM"]["tokens_per_s"],
        "tiny_gpt2_vs_GPT2LMHeadModel": rows["tiny (gpt2 shape)"]["tokens_per_s"]
        / rows["GPT2LMHeadModel"]["tokens_per_s"],
        f"tiny_llama_vs_faster_peer ({faster_peer})": rows[ours]["tokens_per_s"] / rows[faster_peer]["tokens_per_s"],
    }
    return {k: round(v, 3) for k, v in ratios.items()}


def speed_table(rows: dict, ratios: dict, cfg, args: argparse.Namespace, mfu: bool) -> str:
    compiled = ", torch.compile" if args.compile else ""
    lines = [
        f"Training step (forward + backward + AdamW), {args.device}, {args.dtype}{compiled}, "
        f"batch {args.batch} x {args.seq_len} tokens, {cfg.num_hidden_layers} layers x {cfg.hidden_size} wide, "
        f"vocab {cfg.vocab_size}; median of {args.steps * args.rounds} steps, models interleaved.",
        "",
        "| model | params | tokens/s | step (ms) |" + (" MFU |" if mfu else ""),
        "|---|---:|---:|---:|" + ("---:|" if mfu else ""),
    ]
    for name, r in rows.items():
        line = f"| {name} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.1f} |"
        lines.append(line + (f" {r['mfu_vs_989_tflops']:.1%} |" if mfu else ""))
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f}x |" for k, v in ratios.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # the same allocator settings for every model measured
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    models = {name: m.to(device).train() for name, m in build_models(args).items()}
    cfg = next(iter(models.values())).config
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    times = time_rounds(training_steps(models, batch, args), args, device)
    rows = model_rows(models, times, args, device)
    ratios = speed_ratios(rows)
    setup = {
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "vocab": cfg.vocab_size,
        "timed_steps_per_model": args.steps * args.rounds,
    }
    table = speed_table(rows, ratios, cfg, args, mfu=device.type == "cuda")
    figures = {"setup": setup, "models": rows, "ratios": ratios}
    json_path, md_path = write_results(args.name or f"model_speed_{device.type}", figures, table, args.out)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
