"""Long context: how far past its training length does a model still work, under which position scheme?

    tiny-hf long-context --pretrain-steps 400 --model runs/long-context --results bench/results   # from nothing
    tiny-hf long-context --model runs/demo --factor 4 --finetune-steps 100 --alibi-model runs/demo-alibi

A RoPE model trained on `--trained-length` tokens (default: the run's block size) is run at up to `--factor` times
that, with its weights unchanged and the rotary frequencies scaled at load time (`rope_parameters`):
- `none`: plain RoPE, extrapolating to angles it never saw;
- `linear`: Position Interpolation (Chen et al. 2023), every position divided by the factor;
- `linear+finetune`: Position Interpolation followed by `--finetune-steps` of training on blocks of the long length
  (what Chen et al. found necessary: ~200 steps reach the full window);
- `dynamic`: dynamic NTK (bloc97 2023), the base raised only once the input is longer than the trained length;
- `yarn`: YaRN (Peng et al. 2023), only low frequencies interpolated, attention temperature adjusted;
- `alibi`: a model trained with ALiBi (Press et al. 2022) on the same data and length (`--alibi-model`), unchanged.

Two measurements per variant, each with its 95% interval (tiny_hf.results):
- passkey retrieval (Mohtashami & Jaggi 2023), the prompts of training/synthetic.py: `--trials` random 4-digit keys
  per context length, spread over the `--depths`; a key counts when greedy decoding writes it (exactly its tokens,
  then no further digit) right after "The pass key is". Wilson intervals on the rates.
- validation perplexity by token position on the run's natural-text sources (the synthetic ones left out), in
  ranges of the trained length (inside, 1-2x, 2-4x): the mean per-sequence loss with a bootstrap interval.
A cell is marked where its interval does not overlap plain RoPE's (`beyond_noise`).

A model only retrieves if it learned to copy from its context, which a 3M model does not on 2.5 MB of prose in a few
minutes: `--pretrain-steps N` first trains both runs (RoPE at `--model`, ALiBi at `--alibi-model`, default
`<model>-alibi`) on `--data`, the embedded corpus with a small share of synthetic passkey and key-value documents,
with make demo's recipe and one tokenizer trained on the natural text only. A finished run is reused.
Writes `<out>/long_context.{md,json}`, `long_context_ppl.png` and `long_context_passkey.png` (`--results` too).
"""

from __future__ import annotations

import json
import math
import random
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import tiny_hf  # noqa: F401 (registers the Auto classes)
from tiny_hf.options import parse_options
from tiny_hf.results import beyond_noise, bootstrap_interval, interval_cell, wilson_interval, write_results
from tiny_hf.runs import resolve_model
from training.adapt import train_on_blocks
from training.data import build_datasets, parse_data_spec, training_texts
from training.run_log import find_pretraining_run
from training.synthetic import FILLER_SENTENCES, KEY_RANGE, SYNTHETIC_SOURCES, passkey_text

SCALINGS = ("none", "linear", "dynamic", "yarn")  # the same weights, rotary frequencies scaled at load time
VARIANTS = ("none", "linear", "linear+finetune", "dynamic", "yarn", "alibi")
ANSWER_ROOM = 5  # tokens kept free after a passkey prompt: the key (at most 4) and the token after it
BASELINE = "none"  # what the other variants are compared with, cell by cell
PRETRAIN_DATA = "embedded:0.6,passkey:0.2,key-value:0.2"
# --pretrain-steps: make demo's recipe (tiny-3m, Muon, zero-init output projections), 128-token blocks.
PRETRAIN_RECIPE = {
    "model": "tiny-3m",
    "batch_size": 32,
    "optimizer": "muon",
    "set": ["zero_init_output=true"],
    "eval_every": 100,
    "report_to": "none",
    "resume": True,
}
PRETRAIN_LENGTH = 128


@dataclass
class LongContextOptions:
    # model
    model: str = field(
        default="runs/demo", metadata={"help": "a pretraining run folder of a RoPE model (made by --pretrain-steps)"}
    )
    trained_length: int | None = field(
        default=None, metadata={"help": f"default: the run's block size ({PRETRAIN_LENGTH} with --pretrain-steps)"}
    )
    factor: float = field(default=4.0, metadata={"help": "longest context = factor x trained length"})
    variants: str = field(
        default="",
        metadata={
            "help": f"comma-separated, from {list(VARIANTS)} (default: every one that applies: linear+finetune "
            "needs --finetune-steps > 0, alibi an --alibi-model)"
        },
    )
    finetune_steps: int = field(default=50, metadata={"help": "PI fine-tune steps (0: skip that variant)"})
    finetune_lr: float = field(default=3e-4)
    alibi_model: str | None = field(
        default=None, metadata={"help": "a run folder of an ALiBi model trained like --model (--pretrain-steps)"}
    )
    # pretraining both runs first
    pretrain_steps: int = field(default=0, metadata={"help": "train --model and --alibi-model first (0: they exist)"})
    data: str = field(default=PRETRAIN_DATA, metadata={"help": "--pretrain-steps: the data spec of both runs"})
    pretrain_args: str = field(
        default="", metadata={"help": "--pretrain-steps: more tiny-hf pretrain flags, e.g. '--model tiny-1m'"}
    )
    # measurements
    eval_blocks: int = field(default=64, metadata={"help": "validation sequences of the longest length (0: all)"})
    buckets: int = field(default=8, metadata={"help": "position buckets for the perplexity curve"})
    depths: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "passkey depths (0 = right after the intro)"})
    lengths: str = field(default="0.5,1,2,4", metadata={"help": "passkey lengths, in multiples of trained length"})
    trials: int = field(default=100, metadata={"help": "passkeys per length (spread over the depths)"})
    seed: int = field(default=0)
    # output
    out: Path | None = field(default=None, metadata={"help": "default: <model>/long_context"})
    results: Path | None = field(default=None, metadata={"help": "also write the report here (bench/results)"})


# ---------------------------------------------------------------------------------------------------------------------
# Variants: the same weights with scaled rotary frequencies
# ---------------------------------------------------------------------------------------------------------------------
def scaled_config(model_dir: str, scaling: str, factor: float, trained_length: int):
    """The model's config with `scaling` applied for contexts up to factor x trained_length. Validated by TinyConfig:
    a factor below 1 or a non-RoPE model fails here with its message."""
    config = AutoConfig.from_pretrained(model_dir)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is not one of {list(SCALINGS)}")
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1: these scalings extend the context, they do not shrink it")
    longest = math.ceil(factor * trained_length)
    fields = config.to_dict()
    theta = (fields.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    # `dynamic` reads max_position_embeddings as the trained length; the others need the table to cover `longest`.
    fields["max_position_embeddings"] = trained_length if scaling == "dynamic" else max(longest, trained_length)
    if scaling == "none":
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        fields["rope_parameters"] = {"rope_type": scaling, "rope_theta": theta, "factor": float(factor)}
        if scaling == "yarn":
            fields["rope_parameters"]["original_max_position_embeddings"] = trained_length
    return type(config).from_dict(fields)


def load_variant(model_dir: str, scaling: str, factor: float, trained_length: int):
    config = scaled_config(model_dir, scaling, factor, trained_length)
    if config.position_embedding != "rope":
        raise ValueError(f"{model_dir} uses position_embedding={config.position_embedding!r}; RoPE scaling needs rope")
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


def parse_variants(spec: str, *, finetune_steps: int, alibi: bool) -> list[str]:
    """The variants to measure, in VARIANTS order: those `spec` names, or (empty spec) every one that applies."""
    if not spec.strip():
        return [v for v in VARIANTS if (v != "linear+finetune" or finetune_steps > 0) and (v != "alibi" or alibi)]
    names = [v.strip() for v in spec.split(",") if v.strip()]
    if unknown := [v for v in names if v not in VARIANTS]:
        raise ValueError(f"--variants {spec!r}: {unknown} not in {list(VARIANTS)}")
    if "linear+finetune" in names and finetune_steps < 1:
        raise ValueError(f"--variants linear+finetune needs --finetune-steps > 0, not {finetune_steps}")
    if "alibi" in names and not alibi:
        raise ValueError("--variants alibi needs --alibi-model (or --pretrain-steps, which trains one)")
    return [v for v in VARIANTS if v in names]


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------
def position_ranges(trained: int, longest: int) -> list[tuple[int, int]]:
    """Loss positions [start, end) in doublings of the trained length: inside it, 1-2x, 2-4x, ... up to `longest`.
    Position p is the prediction of token p + 1 from p + 1 tokens of context."""
    edges, end = [0], trained
    while end < longest - 1:
        edges.append(end)
        end *= 2
    edges.append(longest - 1)
    return list(zip(edges, edges[1:], strict=False))


@torch.no_grad()
def losses_by_position(model, blocks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Next-token loss (nats) at every position of `blocks` (N, T): an (N, T - 1) tensor."""
    rows = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        rows.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"))  # (B, T-1)
    return torch.cat(rows)


def position_figures(losses: torch.Tensor, buckets: int, ranges: list[tuple[int, int]], seed: int) -> dict:
    """Mean loss per bucket (the curve) and, per range of `ranges`, the perplexity with a bootstrap interval over
    sequences (each sequence's mean loss in the range is one sample)."""
    curve = [chunk.mean().item() for chunk in losses.tensor_split(buckets, dim=1)]
    curve_intervals = [
        bootstrap_interval(chunk.mean(1).tolist(), seed=seed) for chunk in losses.tensor_split(buckets, dim=1)
    ]
    perplexity = {}
    for start, end in ranges:
        loss = bootstrap_interval(losses[:, start:end].mean(1).tolist(), seed=seed)
        perplexity[f"{start}-{end}"] = {**{k: math.exp(loss[k]) for k in ("mean", "low", "high")}, "n": loss["n"]}
    return {"loss_by_position": curve, "loss_intervals": curve_intervals, "perplexity": perplexity}


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt (training/synthetic.py's format, without the answer) with the key sentence at
    `depth` (0..1) of the filler: as many filler sentences as keep the prompt and its answer (ANSWER_ROOM tokens)
    within `length` tokens, so a prompt of the trained length is inside it; none if even that is too long."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth} is not in [0, 1]")

    def prompt(sentences: int) -> list[int]:
        before = round(sentences * depth)
        return tokenizer(passkey_text(key, before, sentences - before, answer=False)).input_ids

    budget = length - ANSWER_ROOM
    per_sentence = len(tokenizer(" " + " ".join(FILLER_SENTENCES)).input_ids) / len(FILLER_SENTENCES)
    sentences = max(0, math.ceil((budget - len(prompt(0))) / per_sentence))
    ids = prompt(sentences)
    while sentences > 0 and len(ids) > budget:  # sentences differ in length: step down to the budget
        sentences -= 1
        ids = prompt(sentences)
    return ids


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group(0)) if match else None


def number_continuations(tokenizer) -> torch.Tensor:
    """(V,) bool: the ids whose text starts with a digit, so they would continue a number written just before."""
    return torch.tensor([tokenizer.decode([i])[:1].isdigit() for i in range(len(tokenizer))])


@torch.no_grad()
def greedy_writes(model, prompts: list[list[int]], answers: list[list[int]], continues: torch.Tensor) -> list[bool]:
    """Whether greedy decoding after each prompt writes exactly its answer's tokens and then no digit.

    Greedy decoding is deterministic, so it writes the answer if and only if the answer's tokens are the argmax
    at each step when the answer is fed in: one forward pass over prompt + answer (no KV cache, so dynamic NTK sees
    every position at one scale). Same-length inputs share a batch, so nothing is padded.

    Args:
        model: a causal LM.
        prompts: token ids of each prompt.
        answers: the token ids each prompt should be continued with.
        continues: `number_continuations(tokenizer)`, the ids that would make the number longer.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        groups.setdefault((len(prompt), len(answer)), []).append(i)
    correct = [False] * len(prompts)
    for (_, answer_len), indices in groups.items():
        for start in range(0, len(indices), 16):
            batch = indices[start : start + 16]
            ids = torch.tensor([prompts[i] + answers[i] for i in batch])  # (B, T)
            # logits at the last prompt position and at each answer token: answer_len + 1 predictions
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer_len + 1).logits  # (B, A+1, V)
            chosen = logits.argmax(-1)  # (B, A+1)
            expected = torch.tensor([answers[i] for i in batch])  # (B, A)
            ok = (chosen[:, :-1] == expected).all(1) & ~continues[chosen[:, -1]]
            for i, value in zip(batch, ok.tolist(), strict=True):
                correct[i] = value
    return correct


def passkey_figures(model, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int) -> dict:
    """Per length: the share of `trials` keys retrieved (Wilson interval), the keys spread evenly over `depths`; and
    the accuracy grid [length][depth] for the plot. The same keys for every variant (`seed`)."""
    if trials < 1:
        raise ValueError(f"trials={trials}: passkey retrieval needs at least one key per length")
    if not depths:
        raise ValueError("depths is empty: give at least one passkey depth in [0, 1]")
    continues = number_continuations(tokenizer)
    rng = random.Random(seed)
    rates, grid = {}, []
    for length in lengths:
        keys = [rng.randint(*KEY_RANGE) for _ in range(trials)]
        cell_depths = [depths[i % len(depths)] for i in range(trials)]
        prompts = [passkey_prompt(tokenizer, length, d, k) for k, d in zip(keys, cell_depths, strict=True)]
        answers = [tokenizer(f" {k}").input_ids for k in keys]
        correct = greedy_writes(model, prompts, answers, continues)
        rates[str(length)] = wilson_interval(sum(correct), trials)
        grid.append(
            [
                sum(c for c, cd in zip(correct, cell_depths, strict=True) if cd == d)
                / max(1, sum(cd == d for cd in cell_depths))
                for d in depths
            ]
        )
    return {"passkey": rates, "passkey_grid": grid}


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining both runs (--pretrain-steps)
# ---------------------------------------------------------------------------------------------------------------------
def natural_spec(spec: str) -> str:
    """The data spec without its synthetic sources: what perplexity is measured and the tokenizer trained on."""
    kept = [f"{source}:{weight}" for source, weight in parse_data_spec(spec) if source not in SYNTHETIC_SOURCES]
    if not kept:
        raise ValueError(
            f"data spec {spec!r} has only synthetic sources ({list(SYNTHETIC_SOURCES)}): perplexity needs natural text"
        )
    return ",".join(kept)


def finished(run: Path, steps: int) -> bool:
    config = run / "run_config.json"
    done = config.is_file() and json.loads(config.read_text()).get("max_steps") == steps
    return done and (run / "model" / "config.json").is_file()


def pretrain_runs(options: LongContextOptions) -> tuple[str, str | None]:
    """Train the RoPE run (--model), then, when alibi is among the variants, the ALiBi run (--alibi-model, default
    <model>-alibi) on --data with the same recipe, seed and tokenizer: unless the pretrain flags name one, a
    tokenizer trained on the natural sources only (the synthetic share does not shape the vocabulary), which the
    ALiBi run takes from the RoPE run's model folder. A run already finished with these steps is kept. Returns both
    folders (None for an ALiBi run not asked for)."""
    from tiny_hf.bpe import train_tokenizer
    from training import pretrain

    rope_run, alibi_run = Path(options.model), Path(options.alibi_model or f"{options.model}-alibi")
    natural_spec(options.data)  # fail before training
    names = parse_variants(options.variants, finetune_steps=options.finetune_steps, alibi=True)
    runs = [(rope_run, "rope")] + ([(alibi_run, "alibi")] if "alibi" in names else [])
    defaults = {
        **PRETRAIN_RECIPE,
        "data": options.data,
        "block_size": options.trained_length or PRETRAIN_LENGTH,
        "max_steps": options.pretrain_steps,
        "seed": options.seed,
    }
    for run, position in runs:
        (recipe,) = parse_options(
            pretrain.PretrainOptions, argv=shlex.split(options.pretrain_args), defaults={**defaults, "out": run}
        )
        if finished(run, options.pretrain_steps):
            print(f"long-context: {run} is trained ({options.pretrain_steps} steps), reused")
            continue
        if recipe.tokenizer is None and run == alibi_run:
            recipe.tokenizer = str(rope_run / "model")
        elif recipe.tokenizer is None and not (run / "tokenizer" / "tokenizer.json").is_file():
            texts = training_texts(natural_spec(options.data), recipe.val_fraction, recipe.cache_dir)
            print(f"long-context: a {recipe.vocab_size}-token tokenizer on {len(texts)} natural documents")
            train_tokenizer(texts, vocab_size=recipe.vocab_size).save_pretrained(run / "tokenizer")  # pretrain's own
        recipe.set = [*recipe.set, f"position_embedding={position}"]
        print(f"long-context: pretraining {run} ({position}, {options.pretrain_steps} steps on {options.data})")
        pretrain.train(recipe)
    return str(rope_run), str(alibi_run) if "alibi" in names else None


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def plots(figures: dict, out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    trained, longest = figures["trained_length"], figures["longest"]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    n = figures["buckets"]
    centers = [(i + 0.5) * (longest - 1) / n for i in range(n)]
    for name, row in figures["variants"].items():
        line = ax.plot(centers, [math.exp(x) for x in row["loss_by_position"]], marker="o", label=name)[0]
        low = [math.exp(x["low"]) for x in row["loss_intervals"]]
        high = [math.exp(x["high"]) for x in row["loss_intervals"]]
        ax.fill_between(centers, low, high, color=line.get_color(), alpha=0.15)
    ax.axvline(trained, color="black", linestyle="--", linewidth=1, label="trained length")
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(f"perplexity by position (bands: 95% bootstrap), up to {figures['factor']:g}x the trained length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ppl_png = out / "long_context_ppl.png"
    fig.savefig(ppl_png, dpi=110)

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    lengths = figures["passkey_lengths"]
    for shift, (name, row) in enumerate(figures["variants"].items()):
        cells = [row["passkey"][str(length)] for length in lengths]
        x = [length * (1 + 0.02 * (shift - len(figures["variants"]) / 2)) for length in lengths]  # dodge the bars
        rates = [100 * c["rate"] for c in cells]
        errors = [[100 * (c["rate"] - c["low"]) for c in cells], [100 * (c["high"] - c["rate"]) for c in cells]]
        ax.errorbar(x, rates, yerr=errors, marker="o", capsize=3, label=name)
    ax.axvline(trained, color="black", linestyle="--", linewidth=1, label="trained length")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("passkey retrieval (%)")
    ax.set_title(f"passkey retrieval, {figures['trials']} keys per point (bars: 95% Wilson)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    passkey_png = out / "long_context_passkey.png"
    fig.savefig(passkey_png, dpi=110)
    return [ppl_png, passkey_png]


def perplexity_cell(figure: dict) -> str:
    """interval_cell's layout for a perplexity (one decimal: perplexities of 100 and more)."""
    return f"{figure['mean']:.1f} ({figure['low']:.1f}–{figure['high']:.1f})"


def columns(figures: dict) -> list[tuple[str, str, bool]]:
    """(header, key, higher is better) of every table column: passkey per length, then perplexity per range."""
    passkey = [(f"passkey @{length}", f"passkey/{length}", True) for length in figures["passkey_lengths"]]
    ppl = [(f"ppl {name}", f"perplexity/{name}", False) for name in figures["position_ranges"]]
    return passkey + ppl


def cell_figure(row: dict, key: str) -> dict:
    kind, name = key.split("/")
    return row[kind][name]


def comparisons(figures: dict) -> dict:
    """Per column, the ordered pairs (better, worse) whose 95% intervals do not overlap."""
    found = {}
    for _, key, higher in columns(figures):
        pairs = []
        names = list(figures["variants"])
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                fa, fb = cell_figure(figures["variants"][a], key), cell_figure(figures["variants"][b], key)
                if beyond_noise(fa, fb):
                    value = "rate" if "rate" in fa else "mean"
                    a_better = (fa[value] > fb[value]) == higher
                    pairs.append([a, b] if a_better else [b, a])
        found[key] = pairs
    return found


def table(figures: dict) -> str:
    trained, cols = figures["trained_length"], columns(figures)
    beyond = figures["beyond_noise"]
    lines = [
        f"## Long context: `{figures['model']}`, trained on {trained} tokens, run at up to {figures['longest']}",
        "",
        f"Passkey retrieval ({figures['trials']} random 4-digit keys per length, spread over depths "
        f"{figures['depths']}; greedy; Wilson 95% interval) and validation perplexity by token position "
        f"({figures['eval_blocks']} sequences of {figures['longest']} tokens of natural text; positions in ranges of "
        f"the trained length; bootstrap 95% interval over sequences). ▲/▼: better/worse than plain RoPE "
        f"(`{BASELINE}`) beyond noise (the intervals do not overlap).",
        "",
        "| variant | " + " | ".join(header for header, _, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, row in figures["variants"].items():
        cells = []
        for _, key, _ in cols:
            figure = cell_figure(row, key)
            text = interval_cell(figure, percent=True) if "rate" in figure else perplexity_cell(figure)
            if [name, BASELINE] in beyond[key]:
                text += " ▲"
            elif [BASELINE, name] in beyond[key]:
                text += " ▼"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Differences beyond noise (95% intervals apart), better > worse:", ""]
    for header, key, _ in cols:
        pairs = beyond[key]
        lines.append(f"- {header}: " + (", ".join(f"{a} > {b}" for a, b in pairs) if pairs else "none"))
    lines += [
        "",
        f"Passkey lengths {figures['passkey_lengths']} tokens (the trained length is {trained}). "
        "Plots: long_context_ppl.png, long_context_passkey.png. "
        f"{figures.get('notes', '')}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every variant is measured on: the model folder, its run, the lengths and the validation blocks."""

    model_dir: str
    run_dir: Path
    names: list[str]  # the variants to measure
    trained: int
    longest: int
    lengths: list[int]  # passkey prompt lengths
    depths: list[float]
    tokenizer: PreTrainedTokenizerBase
    train_blocks: torch.Tensor  # (N, longest): the Position Interpolation fine-tune, the run's own mix
    blocks: torch.Tensor  # (eval_blocks, longest): perplexity by position, natural text only


def load_bench(options: LongContextOptions) -> Bench:
    """Resolve the run and build the long blocks; bad variants, factors and non-RoPE models fail before measuring."""
    model_dir, folders = resolve_model(options.model)
    run_dir = find_pretraining_run(folders)
    if run_dir is None:
        raise FileNotFoundError(f"--model {options.model} is not a pretraining run folder: it has no run_config.json")
    run = json.loads((run_dir / "run_config.json").read_text())
    trained = options.trained_length or run["block_size"]
    names = parse_variants(options.variants, finetune_steps=options.finetune_steps, alibi=bool(options.alibi_model))
    for name in names:
        if name in SCALINGS:
            scaled_config(model_dir, name, options.factor, trained)
    if options.trials < 1:
        raise ValueError(f"--trials {options.trials}: passkey retrieval needs at least one key per length")
    depths = [float(d) for d in options.depths.split(",") if d.strip()]
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths {options.depths!r}: give one or more depths in [0, 1]")
    lengths = [max(16, round(float(x) * trained)) for x in options.lengths.split(",") if x.strip()]
    if not lengths:
        raise ValueError(f"--lengths {options.lengths!r}: give one or more multiples of the trained length")
    longest = math.ceil(options.factor * trained)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_args = dict(
        seed=run.get("seed", 0), val_fraction=run.get("val_fraction", 0.05), cache_dir=run.get("cache_dir", "data")
    )
    _, val_long = build_datasets(natural_spec(run["data"]), tokenizer, longest, **data_args)
    blocks = torch.tensor(val_long["input_ids"], dtype=torch.long)
    blocks = blocks[: options.eval_blocks] if options.eval_blocks > 0 else blocks
    if len(blocks) == 0:
        raise ValueError(f"the run's validation split has no sequence of {longest} tokens: lower --factor")
    train_blocks = torch.empty(0, longest, dtype=torch.long)
    if "linear+finetune" in names:
        train_long, _ = build_datasets(run["data"], tokenizer, longest, **data_args)
        train_blocks = torch.tensor(train_long["input_ids"], dtype=torch.long)
    return Bench(
        model_dir=model_dir,
        run_dir=run_dir,
        names=names,
        trained=trained,
        longest=longest,
        lengths=lengths,
        depths=depths,
        tokenizer=tokenizer,
        train_blocks=train_blocks,
        blocks=blocks,
    )


def measure(options: LongContextOptions, bench: Bench, model) -> dict:
    """Perplexity by position and passkey retrieval by length, with their intervals; retrieval inside and beyond the
    trained length pooled too."""
    keys = passkey_figures(model, bench.tokenizer, bench.lengths, bench.depths, options.trials, options.seed)
    pooled = {}
    for side, inside in (("passkey_within", True), ("passkey_beyond", False)):
        cells = [keys["passkey"][str(n)] for n in bench.lengths if (n <= bench.trained) == inside]
        if cells:
            hits = sum(round(c["rate"] * c["n"]) for c in cells)
            pooled[side] = wilson_interval(hits, sum(c["n"] for c in cells))
    ranges = position_ranges(bench.trained, bench.longest)
    losses = losses_by_position(model, bench.blocks)
    return {**position_figures(losses, options.buckets, ranges, options.seed), **keys, **pooled}


def measure_variants(options: LongContextOptions, bench: Bench) -> dict:
    """Every variant of bench.names, in that order."""
    variants = {}
    for name in bench.names:
        print(f"measuring {name} ...")
        if name in SCALINGS:
            model = load_variant(bench.model_dir, name, options.factor, bench.trained)
            variants[name] = measure(options, bench, model)
        elif name == "linear+finetune":
            model = load_variant(bench.model_dir, "linear", options.factor, bench.trained)
            losses = train_on_blocks(
                model, bench.train_blocks, steps=options.finetune_steps, lr=options.finetune_lr, seed=options.seed
            )
            model.eval()
            variants[name] = {**measure(options, bench, model), "finetune_losses": losses}
        else:  # alibi
            alibi_dir, _ = resolve_model(options.alibi_model)
            alibi = AutoModelForCausalLM.from_pretrained(alibi_dir, dtype=torch.float32).eval()
            if alibi.config.position_embedding != "alibi":
                raise ValueError(
                    f"--alibi-model {options.alibi_model} uses {alibi.config.position_embedding!r}, not alibi"
                )
            variants[name] = measure(options, bench, alibi)
    return variants


def run(options: LongContextOptions) -> dict:
    """The stage with `options` (what `main` parses from the command line); returns its figures."""
    started = time.perf_counter()
    if options.pretrain_steps < 0:
        raise ValueError(f"--pretrain-steps {options.pretrain_steps} must be >= 0")
    if options.pretrain_steps:
        options.model, options.alibi_model = pretrain_runs(options)
    bench = load_bench(options)
    figures = {
        "model": options.model,
        "trained_length": bench.trained,
        "factor": options.factor,
        "longest": bench.longest,
        "buckets": options.buckets,
        "position_ranges": [f"{a}-{b}" for a, b in position_ranges(bench.trained, bench.longest)],
        "eval_blocks": len(bench.blocks),
        "passkey_lengths": bench.lengths,
        "depths": bench.depths,
        "trials": options.trials,
        "seed": options.seed,
        "pretrain_steps": options.pretrain_steps,
        "finetune_steps": options.finetune_steps,
        "variants": measure_variants(options, bench),
    }
    figures["beyond_noise"] = comparisons(figures)
    figures["wall_time_s"] = time.perf_counter() - started
    report = table(figures)
    for out in [options.out or bench.run_dir / "long_context"] + ([options.results] if options.results else []):
        out.mkdir(parents=True, exist_ok=True)
        plots(figures, out)
        write_results("long_context", figures, report, out)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(LongContextOptions, argv=argv, description=__doc__)
    return run(options)


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
