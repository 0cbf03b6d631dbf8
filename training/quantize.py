"""Quantize a pretraining run's model every way we have and compare weight memory, quality and decode speed.

Ours (tiny_hf/quantization.py: absmax and zero-point int8, group-wise int4, weight-only) against the float baselines
and bitsandbytes (LLM.int8, Dettmers et al. 2022; 4-bit NF4 and FP4 from QLoRA, Dettmers et al. 2023). Quality is
validation perplexity and bits per byte on the run's own held-out blocks (training/evaluation.py); speed is greedy
`generate()` tokens/s at batch 1 on this machine.

    tiny-hf quantize --model runs/demo --results bench/results
    tiny-hf quantize --model runs/demo --variants fp32,ours-int4-all --sensitivity
    tiny-hf quantize --model runs/demo --variants fp32 --save runs/demo/bnb

Writes `<out>/quantization.md` and `.json` (default out: `<model>/quantization`); `--results bench/results` also
writes them there. `--save DIR` saves the bitsandbytes 8-bit and NF4 models with `save_pretrained`, reloads them and
checks that the reloaded logits equal the saved model's.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

import tiny_hf  # noqa: F401 (registers the Auto classes)
from tiny_hf.options import parse_options
from tiny_hf.quantization import (
    SCHEMES,
    QuantizedEmbedding,
    QuantizedLinear,
    bnb_cpu_blocks,
    model_weight_bytes,
    quantize_model,
)
from tiny_hf.results import write_results
from training.evaluation import evaluate_lm, validation_set

# bitsandbytes logs a kernel it cannot load at import and a dtype cast at every 8-bit matmul on CPU: both harmless.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

INT8_GOAL, INT4_GOAL, INT4_MEMORY_GOAL = 0.01, 0.05, 0.35  # perplexity change vs fp32; weight memory vs bf16


@dataclass(frozen=True)
class Variant:
    """One way to hold the model: `load(model_dir, fp32_model, group_size)` returns it ready to evaluate."""

    description: str
    bits: int  # what the goal is checked against: 8, 4, or 16+ (no goal)
    load: Callable[[Path, torch.nn.Module, int], torch.nn.Module]


def _float(dtype: torch.dtype) -> Callable:
    return lambda model_dir, fp32, group_size: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _ours(scheme: str, skip: tuple[str, ...] = ("lm_head",)) -> Callable:
    return lambda model_dir, fp32, group_size: quantize_model(copy.deepcopy(fp32), scheme, group_size, skip)


def _bnb(**config) -> Callable:
    # Non-quantized parts (embedding, norms) load in float32: bf16 matmuls are many times slower on CPU.
    return lambda model_dir, fp32, group_size: bnb_cpu_blocks(
        AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**config)
        ).eval(),
        fp32,
    )


def _bnb_4bit(quant_type: str, double_quant: bool = False) -> Callable:
    return _bnb(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=double_quant,
    )


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("float32 (as trained)", 32, _float(torch.float32)),
    "bf16": Variant("bfloat16", 16, _float(torch.bfloat16)),
    "ours-int8": Variant("ours: absmax int8, one scale per tensor", 8, _ours("int8")),
    "ours-int8-channel": Variant("ours: absmax int8, one scale per output row", 8, _ours("int8-channel")),
    "ours-int8-zeropoint": Variant("ours: zero-point int8 per output row", 8, _ours("int8-zeropoint")),
    "ours-int4": Variant("ours: absmax int4, group-wise", 4, _ours("int4")),
    "ours-int4-zeropoint": Variant("ours: zero-point int4, group-wise", 4, _ours("int4-zeropoint")),
    "ours-int4-all": Variant("ours: absmax int4, group-wise, tied embedding/lm_head too", 4, _ours("int4", skip=())),
    "bnb-int8": Variant("bitsandbytes LLM.int8", 8, _bnb(load_in_8bit=True)),
    "bnb-nf4": Variant("bitsandbytes NF4, blocks of 64", 4, _bnb_4bit("nf4")),
    "bnb-nf4-dq": Variant("bitsandbytes NF4 + double quant", 4, _bnb_4bit("nf4", double_quant=True)),
    "bnb-fp4": Variant("bitsandbytes FP4, blocks of 64", 4, _bnb_4bit("fp4")),
}
SAVED_VARIANTS = ("bnb-int8", "bnb-nf4")  # what --save writes and reloads


@dataclass
class QuantizeOptions:
    # what to quantize
    model: Path = field(metadata={"help": "a pretraining run folder (model/ + run_config.json)"})
    variants: str = field(default=",".join(VARIANTS), metadata={"help": f"comma-separated, from {list(VARIANTS)}"})
    # 32, not 64: it divides every preset's widths (tiny-3m's hidden size 160 and tiny-10m's 288 are not multiples
    # of 64). bitsandbytes' blocks of 64 run over the flattened matrix, so they need no such divisor.
    group_size: int = field(default=32, metadata={"help": "inputs per scale for our int4 schemes"})
    # measurement
    eval_blocks: int = field(default=64, metadata={"help": "validation blocks (pretraining's default)"})
    decode_tokens: int = field(default=64, metadata={"help": "new tokens per timed greedy generate"})
    prompt: str = field(default="The json module", metadata={"help": "the same prompt for every variant"})
    sensitivity: bool = field(default=False, metadata={"help": "also int4 one kind of layer at a time"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (1 is steadier on a busy box)"})
    # output
    out: Path | None = field(default=None, metadata={"help": "default: <model>/quantization"})
    results: Path | None = field(default=None, metadata={"help": "also write the table here, e.g. bench/results"})
    save: Path | None = field(
        default=None, metadata={"help": f"save + reload {list(SAVED_VARIANTS)} under this folder"}
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------
def bnb_state_bytes(model: torch.nn.Module) -> int:
    """Bytes bitsandbytes keeps beside its integer weights as tensor attributes, not parameters: LLM.int8's per-row
    scales (SCB) and the 4-bit per-block absmax (8-bit + one float per 256 blocks with double quant)."""
    total = 0
    for param in model.parameters():
        if getattr(param, "SCB", None) is not None:
            total += param.SCB.nbytes
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.nbytes + state.code.nbytes
            if state.nested:
                total += state.state2.absmax.nbytes + state.state2.code.nbytes + 4  # + the float offset
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Every weight as stored: parameters (a tied one once), our quantized buffers, bitsandbytes' side tensors."""
    return model_weight_bytes(model) + bnb_state_bytes(model)


def embedding_bytes(model: torch.nn.Module) -> int:
    """Bytes of the input embedding and lm_head (once if tied, or if sharing quantized buffers)."""
    tensors = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if isinstance(module, QuantizedLinear | QuantizedEmbedding):
            found = [b for b in module.buffers(recurse=False)]
        else:
            found = list(module.parameters(recurse=False))
        tensors.update({(t.data_ptr(), t.nbytes): t for t in found})
    return sum(t.nbytes for t in tensors.values())


@torch.no_grad()
def decode_speed(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int) -> tuple[float, str]:
    """Greedy tokens/s at batch 1 for exactly `new_tokens` new tokens (after an untimed warm-up call), and the text."""
    inputs = tokenizer(prompt, return_tensors="pt")
    settings = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.generate(**inputs, max_new_tokens=2, **settings)
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    elapsed = time.perf_counter() - start
    new = output[0, inputs["input_ids"].shape[1] :]
    return len(new) / elapsed, tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def first_block_logits(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    return model(input_ids=blocks[:1], use_cache=False).logits.float()


def save_and_reload(model: torch.nn.Module, tokenizer, blocks: torch.Tensor, folder: Path) -> dict:
    """Save a bitsandbytes model with `save_pretrained`, load it back from disk, and compare logits on one block."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = bnb_cpu_blocks(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), None)
    diff = (first_block_logits(model, blocks) - first_block_logits(reloaded, blocks)).abs().max().item()
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"path": str(folder), "safetensors_bytes": disk, "max_abs_logit_diff": diff}


def goal(variant: Variant, change: float, ratio: float) -> str:
    """The issue's goals: int8 within 1% of fp32 perplexity; 4-bit within 5% at <= 0.35x the bf16 weight memory."""
    if variant.bits == 8:
        return "met" if abs(change) <= INT8_GOAL else f"missed: ppl {change:+.1%}"
    if variant.bits == 4:
        misses = [f"ppl {change:+.1%}"] if change > INT4_GOAL else []
        misses += [f"{ratio:.2f}x memory"] if ratio > INT4_MEMORY_GOAL else []
        return "missed: " + ", ".join(misses) if misses else "met"
    return ""


def layer_sensitivity(fp32: torch.nn.Module, blocks, byte_lengths, group_size: int, base_ppl: float) -> dict:
    """Perplexity change with only one kind of layer in int4 (the tied embedding/lm_head counts as one kind): which
    layers a 4-bit model should keep at higher precision."""
    kinds = sorted({name.rsplit(".", 1)[-1] for name, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)})
    changes = {}
    for kind in kinds:
        model = quantize_model(copy.deepcopy(fp32), "int4", group_size, skip=[k for k in kinds if k != kind])
        changes[kind] = evaluate_lm(model, blocks, byte_lengths)["val_perplexity"] / base_ppl - 1
    return changes


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def table(figures: dict) -> str:
    rows = figures["variants"]
    lines = [
        f"## Quantization of `{figures['model']}` ({figures['parameters'] / 1e6:.2f}M parameters)",
        "",
        "| variant | what | weights MB | x bf16 | embed/head MB | val ppl | ppl vs fp32 | bits/byte | decode tok/s "
        "| goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['description']} | {r['weight_bytes'] / 1e6:.2f} | {r['ratio_to_bf16']:.2f} "
            f"| {r['embedding_bytes'] / 1e6:.2f} | {r['val_perplexity']:.2f} | {r['ppl_change_vs_fp32']:+.2%} "
            f"| {r['val_bits_per_byte']:.4f} | {r['decode_tokens_per_s']:.1f} | {r['goal']} |"
        )
    emb = figures["embedding_parameters"]
    lines += [
        "",
        f"Weights = every parameter (the tied embedding/lm_head once) + our integers, scales (float32) and zero "
        f"points + bitsandbytes' SCB/absmax; float parts stay as loaded (float32, except the bf16 row). `x bf16` "
        f"divides by the whole model in bf16 ({figures['bf16_bytes'] / 1e6:.2f} MB). The tied embedding/lm_head is "
        f"{emb / 1e6:.2f}M of the {figures['parameters'] / 1e6:.2f}M parameters ({emb / figures['parameters']:.0%}), "
        f"and every variant but `ours-int4-all` leaves it in float32 ({4 * emb / 1e6:.2f} MB alone = "
        f"{4 * emb / figures['bf16_bytes']:.2f}x bf16): they cannot reach the 0.35x goal whatever their linear "
        "layers do. Quantizing the shared matrix once (tied, int4) is what gets under it.",
        f"Our int4 uses groups of {figures['group_size']} inputs per scale; bitsandbytes 4-bit uses blocks of 64 over "
        f"the flattened matrix. Perplexity on {figures['eval_tokens']:,} validation tokens; decode = greedy "
        f"`generate()`, batch 1, {figures['decode_tokens']} new tokens after the prompt {figures['prompt']!r}, on "
        "CPU (bf16 matmuls and bitsandbytes' CPU kernels are slow there: memory wins, not CPU speed, are the point).",
        f"Goals: int8 within {INT8_GOAL:.0%} of fp32 perplexity; 4-bit within {INT4_GOAL:.0%} at <= "
        f"{INT4_MEMORY_GOAL}x bf16 weight memory.",
    ]
    if figures.get("sensitivity"):
        worst = max(figures["sensitivity"], key=figures["sensitivity"].get)
        cells = ", ".join(f"{k} {v:+.2%}" for k, v in sorted(figures["sensitivity"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"Int4 one kind of layer at a time (perplexity change): {cells}. Most sensitive: {worst}."]
    if figures.get("save_reload"):
        for name, r in figures["save_reload"].items():
            lines.append(
                f"\n`--save`: {name} saved ({r['safetensors_bytes'] / 1e6:.2f} MB of safetensors) and reloaded; "
                f"max |logit difference| = {r['max_abs_logit_diff']:.3g}."
            )
    return "\n".join(lines) + "\n"


def variant_names(spec: str) -> list[str]:
    """`--variants` as a list, fp32 first: every change is measured against it."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"--variants {spec!r}: {unknown or 'none given'}; choose from {list(VARIANTS)}")
    return ["fp32"] + [n for n in names if n != "fp32"]


def load_run(options: QuantizeOptions) -> tuple[Path, PreTrainedTokenizerBase, torch.Tensor, torch.Tensor, nn.Module]:
    """The run's model folder, tokenizer, validation blocks and byte lengths, and its float32 model. A bad
    --group-size fails here, before any measuring."""
    model_dir = options.model / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {options.model} is not a pretraining run folder: it has no model/config.json"
        )
    tokenizer_dir = model_dir if (model_dir / "tokenizer.json").is_file() else options.model / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks, byte_lengths = validation_set(options.model, tokenizer, max_blocks=options.eval_blocks)
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer in fp32.modules():
        if isinstance(layer, torch.nn.Linear):
            QuantizedLinear(layer.in_features, layer.out_features, scheme="int4", group_size=options.group_size)
    return model_dir, tokenizer, blocks, byte_lengths, fp32


def measure_variant(name: str, model: torch.nn.Module, tokenizer, blocks, byte_lengths, figures: dict) -> dict:
    """One row of the table: weight memory, quality against fp32 (measured first), decode speed and the goal."""
    variant = VARIANTS[name]
    metrics = evaluate_lm(model, blocks, byte_lengths)
    tokens_per_s, sample = decode_speed(model, tokenizer, figures["prompt"], figures["decode_tokens"])
    base_ppl = figures["variants"]["fp32"]["val_perplexity"] if name != "fp32" else metrics["val_perplexity"]
    change = metrics["val_perplexity"] / base_ppl - 1
    size = weight_bytes(model)
    return {
        "description": variant.description,
        "weight_bytes": size,
        "ratio_to_bf16": size / figures["bf16_bytes"],
        "embedding_bytes": embedding_bytes(model),
        **metrics,
        "ppl_change_vs_fp32": change,
        "decode_tokens_per_s": tokens_per_s,
        "sample": sample,
        "goal": goal(variant, change, size / figures["bf16_bytes"]),
    }


def run(options: QuantizeOptions) -> dict:
    """The stage with `options` (what `main` parses from the command line); returns its figures."""
    if options.threads:
        torch.set_num_threads(options.threads)
    names = variant_names(options.variants)
    model_dir, tokenizer, blocks, byte_lengths, fp32 = load_run(options)
    figures = {
        "model": str(options.model),
        "parameters": sum(p.numel() for p in fp32.parameters()),
        "embedding_parameters": fp32.get_input_embeddings().weight.numel(),
        "bf16_bytes": sum(p.numel() for p in fp32.parameters()) * 2,
        "group_size": options.group_size,
        "eval_tokens": int(blocks[:, 1:].numel()),
        "decode_tokens": options.decode_tokens,
        "prompt": options.prompt,
        "schemes": list(SCHEMES),
        "variants": {},
    }
    saved = {}
    progress = tqdm(names, desc="variants", disable=options.no_progress)
    for name in progress:
        progress.set_postfix(variant=name)
        model = VARIANTS[name].load(model_dir, fp32, options.group_size)
        figures["variants"][name] = measure_variant(name, model, tokenizer, blocks, byte_lengths, figures)
        if options.save is not None and name in SAVED_VARIANTS:
            saved[name] = save_and_reload(model, tokenizer, blocks, options.save / name)
        del model
    if options.sensitivity:
        base_ppl = figures["variants"]["fp32"]["val_perplexity"]
        figures["sensitivity"] = layer_sensitivity(fp32, blocks, byte_lengths, options.group_size, base_ppl)
    if options.save is not None:  # the saved variants may not have been among --variants
        for name in (n for n in SAVED_VARIANTS if n not in saved):
            model = VARIANTS[name].load(model_dir, fp32, options.group_size)
            saved[name] = save_and_reload(model, tokenizer, blocks, options.save / name)
        figures["save_reload"] = {name: saved[name] for name in SAVED_VARIANTS}

    table_md = table(figures)
    write_results("quantization", figures, table_md, options.out or options.model / "quantization")
    if options.results is not None:
        write_results("quantization", figures, table_md, options.results)
    print(table_md)
    return figures


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(QuantizeOptions, argv=argv, description=__doc__)
    return run(options)


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
