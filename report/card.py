"""`make report`: one Markdown report card of the whole stack, with plots, in `report/REPORT.md`.

    tiny-hf report                  # gather from runs/ and bench/results; run what is missing
    tiny-hf report --quick          # a tiny model for a few steps + the committed results (< 5 min)
    tiny-hf report --quick -- --data notes/ --tokenizer my-tokenizer   # extra pretrain.py flags

Sections: machine and versions; corpus and tokenizer (bytes per token against WordPiece and Unigram); training
curves and ablations; validation loss and bits per byte; standard evaluation (lm-evaluation-harness); fine-tuning,
SFT and the alignment table; quantization and pruning; serving speed; RAG recall; the long-context heatmap.

Where the figures come from, in order, and each section says which it used:
1. this run: the pretraining run folder (`--run`, default `runs/demo`: `make demo`), the stage folders inside it
   (`quantization/`, `long_context/`) and the other run folders under `--runs` (`sft/`, `reward/`, `ppo/`, ...);
2. committed results: `bench/results/*.json|md`, the figures the repository ships, with the machine they ran on;
3. default mode only: a stage whose run folder is missing is run here at a small budget: pretraining (into
   `runs/report`, ~5 minutes on 2 CPU cores), then quantization and the long-context measurement of that run.
`--quick` trains a tiny config for a few steps in a temporary folder (the training and validation sections are
real, the numbers are not) and takes everything else from run folders or committed results. A section with no source
says so; one whose builder fails says why (`--strict` raises instead) and the rest of the card is still written.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from tiny_hf.options import parse_options
from training.report import eval_records, plot_loss_curves, read_metrics, run_results

REPORT_FILE = "REPORT.md"
VERSIONED = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "accelerate",
    "peft",
    "trl",
    "bitsandbytes",
    "safetensors",
    "evaluate",
)
# --quick: a 2-layer, 64-wide model on 64-token blocks with a 2,048-token tokenizer, 40 steps (~1 minute on 2 cores).
# Pretraining's options where these recipes differ from its defaults.
QUICK_PRETRAIN = {
    "model": "tiny-1m",
    "vocab_size": 2048,
    "set": ["hidden_size=64", "num_hidden_layers=2", "num_attention_heads=4", "intermediate_size=128"],
    "block_size": 64,
    "batch_size": 8,
    "warmup_steps": 5,
    "eval_every": 20,
    "eval_blocks": 8,
    "log_every": 5,
    "sample_tokens": 16,
    "save_every": 100000,
}
# Default mode, when there is no pretraining run: `make demo`'s recipe at a third of its steps (~3-5 minutes).
SMALL_PRETRAIN = {"model": "tiny-3m", "block_size": 128, "batch_size": 32, "eval_every": 50}
SMALL_QUANTIZE = {
    "variants": "fp32,bf16,ours-int8-channel,ours-int4,ours-int4-all,bnb-int8,bnb-nf4",
    "eval_blocks": 32,
    "decode_tokens": 32,
}
SMALL_LONG_CONTEXT = {"finetune_steps": 20, "eval_blocks": 8, "trials": 2}


@dataclass
class CardOptions:
    # ---- sources ----
    run: Path = field(default=Path("runs/demo"), metadata={"help": "the pretraining run folder to report"})
    runs: Path = field(default=Path("runs"), metadata={"help": "where the other stages' run folders are"})
    results: Path = field(default=Path("bench/results"), metadata={"help": "committed results"})
    # ---- budget ----
    quick: bool = field(default=False, metadata={"help": "train a tiny config; gather everything else"})
    gather_only: bool = field(default=False, metadata={"help": "never run a missing stage (default mode)"})
    max_steps: int | None = field(default=None, metadata={"help": "pretraining steps (quick: 40, default: 200)"})
    train_out: Path | None = field(
        default=None,
        metadata={"help": "where a run trained here goes (quick: a temporary folder, default: runs/report)"},
    )
    # ---- output ----
    out: Path = field(default=Path("report"), metadata={"help": "the folder of REPORT.md and its images"})
    strict: bool = field(default=False, metadata={"help": "raise when a section fails instead of noting it"})
    # ---- system ----
    seed: int = field(default=0, metadata={"help": "seed of a run trained here"})
    # the extra training/pretrain.py flags, after `--` (not an option of the card itself)
    pretrain_args: list[str] = field(default_factory=list, init=False)


def parse_args(argv: list[str] | None = None) -> CardOptions:
    """The card's options from `argv` (default: the command line); everything after `--` goes to pretraining."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    (options,) = parse_options(CardOptions, argv=argv[:split], description=__doc__)
    options.pretrain_args = argv[split + 1 :]
    if options.run != CardOptions.run and not options.run.is_dir():
        raise ValueError(f"--run {options.run}: no such run folder (without --run the card trains one if needed)")
    return options


# ---------------------------------------------------------------------------------------------------------------------
# The card: an output folder, and the helpers every section uses to put figures and links in it
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One `##` section: its title, where its figures come from (one line), and its Markdown body."""

    title: str
    source: str
    body: list[str] = field(default_factory=list)


class Card:
    """The output folder: images are written or copied into it, and links are made relative to it."""

    def __init__(self, out: Path, committed: Path, ephemeral: Path | None = None):
        self.out = out
        self.committed = committed.resolve()  # files here are in git: linked
        self.ephemeral = ephemeral.resolve() if ephemeral is not None else None  # deleted once the card is written
        self.images: list[str] = []

    def link(self, path: Path, text: str | None = None) -> str:
        """A committed file as a Markdown link relative to the card (it resolves wherever the card is written); a
        run folder's file (not in git, so a link would break for anyone else) or a temporary one as its path."""
        path = Path(path).resolve()
        if self.ephemeral is not None and path.is_relative_to(self.ephemeral):
            return f"`{text or path.name}` (temporary, removed)"
        if not path.is_relative_to(self.committed):
            shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
            return f"`{shown}`"
        return f"[{text or path.name}]({os.path.relpath(path, self.out.resolve())})"

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        fig.tight_layout()
        fig.savefig(self.out / name)
        self.images.append(name)
        return f"![{alt}]({name})"

    def copy_image(self, source: Path, prefix: str) -> str:
        name = f"{prefix}_{source.name}" if not source.name.startswith(prefix) else source.name
        shutil.copyfile(source, self.out / name)
        self.images.append(name)
        return name

    def embed(self, md_path: Path, prefix: str, images: bool = True, level: int = 3) -> list[str]:
        """A committed or run Markdown file inside a section: headings shifted so its top one is `level` (below the
        section's), its images (linked, or named in the text like `margins.png`) copied here under `prefix_`, links
        to them rewritten."""
        text = md_path.read_text(encoding="utf-8").strip()
        depths = [len(h) for h in re.findall(r"^(#{1,6}) ", text, flags=re.M)]
        shift = level - min(depths) if depths else 0
        text = re.sub(r"^(#{1,6}) ", lambda m: "#" * min(len(m.group(1)) + shift, 6) + " ", text, flags=re.M)
        linked = set()

        def relink(match: re.Match) -> str:
            alt, target = match.group(1), match.group(2)
            source = md_path.parent / target
            if "://" in target:
                return match.group(0)
            if not source.is_file():
                return f"({alt}: {target} is missing)"
            if not images:
                return self.link(source)
            linked.add(source.name)
            return f"![{alt}]({self.copy_image(source, prefix)})"

        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", relink, text)
        lines = text.splitlines()
        if images:
            for name in sorted(set(re.findall(r"[\w.-]+\.png", text)) - linked):
                source = md_path.parent / name
                if source.is_file() and not name.startswith(prefix + "_"):
                    lines += ["", f"![{name}]({self.copy_image(source, prefix)})"]
        return lines


def results_file(results: Path, name: str) -> Path | None:
    path = results / name
    return path if path.is_file() else None


def committed(card: Card, path: Path) -> str:
    """The source line of a section built from committed results: the file and when/where it was measured."""
    machine = {}
    json_path = path.with_suffix(".json")
    if json_path.is_file():
        machine = json.loads(json_path.read_text()).get("machine", {})
    where = f", measured {machine['date']} on {machine.get('gpu') or machine.get('cpu')}" if machine else ""
    return f"committed results: {card.link(path)}{where}"


def table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    """A Markdown table; `align` is one character per column: 'l' or 'r' (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------
def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_section(card: Card, ctx: dict) -> Section:
    from tiny_hf.results import machine_info

    info = machine_info()
    rows = [
        ["date", info["date"]],
        ["CPU", f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"],
        ["GPU", info["gpu"] or "none"],
        ["Python", info["python"]],
    ]
    rows += [[package, version(package)] for package in VERSIONED]
    body = table(["", ""], rows, "ll")
    body += [
        "",
        f"Mode: {ctx['mode']}. Built in {{elapsed}}. Committed results name the machine they ran on; "
        "ratios carry over between machines, absolute speeds do not.",
    ]
    return Section("Machine and versions", "this machine, now", body)


def tokenizer_section(card: Card, ctx: dict) -> Section:
    run = ctx["run"]
    body, sources = [], []
    if run is not None:
        from transformers import AutoTokenizer

        from training.evaluation import validation_set

        config = json.loads((run / "run_config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(run / "model")
        blocks, byte_lengths = validation_set(run, tokenizer, max_blocks=None)
        bytes_per_token = byte_lengths[blocks].sum().item() / blocks.numel()
        train_blocks = config.get("train_blocks", 0)
        pass_tokens = train_blocks * config["block_size"] / 1e6
        body += [
            f"The run's tokenizer: byte-level BPE (`tiny_hf/bpe.py`), {len(tokenizer):,} tokens, trained on "
            f"`{config['data']}`; {bytes_per_token:.2f} bytes per token on its {len(blocks):,} validation blocks of "
            f"{config['block_size']} tokens; {train_blocks:,} training blocks ({pass_tokens:.2f}M tokens per pass).",
            "",
        ]
        sources.append(f"this run ({card.link(run / 'run_config.json')})")
    path = results_file(ctx["results"], "tokenizers.md")
    if path is not None:
        figures = json.loads(path.with_suffix(".json").read_text())
        corpus = figures.get("corpus", {})
        if corpus:
            body += [
                f"The embedded corpus (Python's own documentation): {corpus['train_docs']} training documents "
                f"({corpus['train_mb']:.2f} MB), {corpus['val_docs']} validation documents "
                f"({corpus['val_mb']:.2f} MB).",
                "",
            ]
        body += [tokenizer_plot(card, figures["results"]), ""]
        body += card.embed(path, "tokenizers")
        sources.append(committed(card, path))
    if not sources:
        return Section(
            "Corpus and tokenizer",
            "none",
            ["No pretraining run and no committed `tokenizers.md`: run `tiny-hf bench tokenizer`."],
        )
    return Section("Corpus and tokenizer", "; ".join(sources), body)


def tokenizer_plot(card: Card, results: list[dict]) -> str:
    names = list(dict.fromkeys(r["tokenizer"] for r in results))
    vocabs = sorted({r["vocab_size"] for r in results})
    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(vocabs)
    for j, vocab in enumerate(vocabs):
        values = [
            next((r["bytes_per_token"] for r in results if r["tokenizer"] == n and r["vocab_size"] == vocab), 0)
            for n in names
        ]
        ax.bar([i + j * width for i in range(len(names))], values, width, label=f"vocab {vocab:,}")
    ax.set_xticks([i + width * (len(vocabs) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("bytes per token (higher = shorter)")
    ax.set_ylim(bottom=min(r["bytes_per_token"] for r in results) * 0.9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return card.figure(fig, "tokenizers.png", "bytes per token by tokenizer")


def training_section(card: Card, ctx: dict) -> Section:
    run, body, sources = ctx["run"], [], []
    if run is not None:
        records = read_metrics(run)
        results = run_results(records)
        config = json.loads((run / "run_config.json").read_text())
        model = json.loads((run / "model" / "config.json").read_text())
        body += [
            f"`{run.name}`: {config.get('parameters', 0) / 1e6:.2f}M parameters ({model['num_hidden_layers']} "
            f"layers x {model['hidden_size']}, {model['position_embedding']}, {model['norm']}, {model['mlp']}), "
            f"{config['max_steps']} steps of {config['batch_size']} x {config['block_size']} tokens, lr "
            f"{config['lr']} ({config['schedule']}), {results.get('tokens', 0):,} tokens at "
            f"{results.get('tokens_per_s', 0):,.0f} tokens/s (median); final train loss "
            f"{results.get('final_train_loss', float('nan')):.3f}, {results['skipped_steps']} skipped steps.",
            "",
        ]
        plot_loss_curves({run.name: records}, card.out / "loss_curve.png", title=f"pretraining: {run.name}")
        card.images.append("loss_curve.png")
        body += ["![training loss curve](loss_curve.png)", ""]
        sources.append(f"this run ({card.link(run / 'metrics.jsonl')})")
    path = results_file(ctx["results"], "ablations.md")
    if path is not None:
        figures = json.loads(path.with_suffix(".json").read_text())
        setup = figures.get("setup", {})
        body += [
            f"### Ablations: one component at a time ({setup.get('model')}, {setup.get('max_steps')} steps of "
            f"{setup.get('batch_size')} x {setup.get('block_size')} tokens, same data, tokens and seed)",
            "",
        ]
        body += [ablation_plot(card, figures["results"]), ""]
        rows = []
        for study, variants in figures["results"].items():
            ranked = sorted(variants.items(), key=lambda kv: kv[1]["val_loss"])
            rows.append(
                [
                    study,
                    *(f"{n} {v['val_loss']:.3f}" for n, v in ranked[:1]),
                    ", ".join(f"{n} {v['val_loss']:.3f}" for n, v in ranked[1:]),
                ]
            )
        body += table(["study", "best (val loss)", "the others"], rows, "lll")
        body += [
            "",
            f"One seed and a short budget: differences under ~0.05 are noise. Full tables: {card.link(path)}.",
        ]
        sources.append(committed(card, path))
    if not sources:
        return Section("Training curves and ablations", "none", ["No pretraining run and no committed ablations."])
    return Section("Training curves and ablations", "; ".join(sources), body)


def ablation_plot(card: Card, results: dict) -> str:
    fig = Figure(figsize=(10, 2.8), dpi=100)
    for i, (study, variants) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        names = list(variants)
        losses = [variants[n]["val_loss"] for n in names]
        best = min(losses)
        ax.barh(names, losses, color=["C2" if v == best else "C0" for v in losses])
        ax.set_xlim(min(losses) - 0.2, max(losses) + 0.1)
        ax.set_title(study, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("val loss", fontsize=8)
    return card.figure(fig, "ablations.png", "validation loss per ablation")


def validation_section(card: Card, ctx: dict) -> Section:
    run = ctx["run"]
    if run is None:
        return Section("Validation loss and bits per byte", "none", ["No pretraining run to evaluate."])
    evals = eval_records(read_metrics(run))
    if not evals:
        return Section("Validation loss and bits per byte", "none", [f"`{run}` has no evaluation records."])
    rows = [
        [
            fmt(r.get("step")),
            fmt(r.get("tokens")),
            fmt(r["val_loss"]),
            fmt(r.get("val_perplexity"), 1),
            fmt(r.get("val_bits_per_byte")),
        ]
        for r in evals
    ]
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    x_key = "tokens" if all("tokens" in r for r in evals) else "step"
    ax.plot([r[x_key] for r in evals], [r.get("val_bits_per_byte") for r in evals], marker="o")
    ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    body = [card.figure(fig, "val_bits_per_byte.png", "validation bits per byte"), ""]
    body += table(["step", "tokens", "val loss (nats/token)", "perplexity", "bits per byte"], rows)
    body += [
        "",
        "Bits per byte = loss x tokens / (bytes x ln 2): unlike perplexity it compares models with different "
        "tokenizers. The validation documents never appear in training (split by a hash of each document's "
        "id).",
    ]
    return Section("Validation loss and bits per byte", f"this run ({card.link(run / 'metrics.jsonl')})", body)


EVAL_RUNS = (
    "sft",
    "dpo",
    "grpo",
    "rloo",
    "ppo",
)  # later stages' run folders under --runs that `tiny-hf eval` may fill


def harness_results(ctx: dict) -> tuple[list[tuple[str, dict]], list[str]]:
    """(name, results.json) of every evaluated run (this run, then the stages under --runs), else the committed
    `eval_*.json`; and the files read."""
    folders = ([("this run", ctx["run"])] if ctx["run"] is not None else []) + [
        (name, ctx["runs"] / name) for name in EVAL_RUNS
    ]
    found = [(name, folder / "eval" / "results.json") for name, folder in folders]
    found = [(name, path) for name, path in found if path.is_file()]
    if not found:
        found = [(path.stem.removeprefix("eval_"), path) for path in sorted(ctx["results"].glob("eval_*.json"))]
    return [(name, json.loads(path.read_text())) for name, path in found], [str(path) for _, path in found]


def evaluation_section(card: Card, ctx: dict) -> Section:
    title = "Standard evaluation (lm-evaluation-harness)"
    evaluated, files = harness_results(ctx)
    if not evaluated:
        return Section(title, "none", ["No standard evaluation: run `tiny-hf eval --model runs/demo`."])
    rows = []
    for name, results in evaluated:
        for task, metrics in results["tasks"].items():
            for metric in ("bits_per_byte", "acc", "acc_norm", "exact_match"):
                if metric in metrics:
                    stderr = metrics.get(f"{metric}_stderr")
                    rows.append([name, task, metrics.get("n"), metric, fmt(metrics[metric]), fmt(stderr)])
    body = table(["model", "task", "n", "metric", "value", "± stderr"], rows)
    body += [
        "",
        "The project's tasks (alignment/eval_tasks/): held-out bits per byte of each document scored whole, a "
        "four-way choice of the span that continues a held-out passage (chance 0.25), and greedy exact match on the "
        "verifiable task's held-out questions. Standard errors as the harness reports them.",
    ]
    source = ", ".join(card.link(Path(f)) for f in files)
    return Section(title, source, body)


def stage_summary(ctx: dict, run_name: str, result_name: str | None) -> tuple[dict | None, str | None]:
    """A stage's figures: `<runs>/<run_name>/summary.json`, else committed `<results>/<result_name>.json`."""
    path = ctx["runs"] / run_name / "summary.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    if result_name and (ctx["results"] / f"{result_name}.json").is_file():
        path = ctx["results"] / f"{result_name}.json"
        return json.loads(path.read_text()), str(path)
    return None, None


def _lm_cells(f: dict) -> list:
    return ["val loss", f"{f['before']['val_loss']:.3f}", f"{f['after']['val_loss']:.3f}"]


# One row per stage: (stage, its run folder under --runs, its committed results stem or None, and the measure,
# before and after cells from its figures).
ALIGNMENT_STAGES: list[tuple[str, str, str | None, Callable[[dict], list]]] = [
    ("LoRA (PEFT)", "lora", None, _lm_cells),
    ("QLoRA (NF4 base)", "qlora", None, _lm_cells),
    (
        "LoRA sentiment classifier",
        "lora-sentiment",
        None,
        lambda f: ["accuracy", pct(f["before"]["accuracy"]), pct(f["after"]["accuracy"])],
    ),
    (
        "SFT",
        "sft",
        "sft",
        lambda f: ["held-out assistant loss", f"{f['held_out_loss_before']:.3f}", f"{f['held_out_loss_after']:.3f}"],
    ),
    (
        "SFT, verifiable task",
        "sft",
        "sft",
        lambda f: ["exact match", pct(f.get("exact_match_before")), pct(f.get("exact_match_after"))],
    ),
    (
        "reward model",
        "reward",
        "reward_model",
        lambda f: ["held-out pair accuracy", pct(f["before"]["accuracy"]), pct(f["after"]["accuracy"])],
    ),
    (
        "DPO",
        "dpo",
        None,
        lambda f: [
            "held-out reward accuracy",
            pct(f.get("before", {}).get("accuracy")),
            pct(f.get("after", {}).get("accuracy")),
        ],
    ),
    (
        "PPO",
        "ppo",
        None,
        lambda f: [
            "mean reward (KL to SFT)",
            fmt(f.get("first_reward")),
            f"{fmt(f.get('last_reward'))} ({fmt(f.get('last_kl'))})",
        ],
    ),
    (
        "GRPO",
        "grpo",
        "grpo",
        lambda f: [
            "held-out exact match",
            pct(f.get("held_out_exact_match_before")),
            pct(f.get("held_out_exact_match_after")),
        ],
    ),
]


def alignment_rows(card: Card, ctx: dict) -> tuple[list[list], list[str]]:
    """The table rows of `ALIGNMENT_STAGES`, and where each found row came from (a run folder's name, or
    "committed")."""
    rows, sources = [], []
    for stage, run_name, result_name, cells in ALIGNMENT_STAGES:
        figures, where = stage_summary(ctx, run_name, result_name)
        if figures is None:
            rows.append([stage, "-", "-", "-", "-", f"not run (no `{run_name}/summary.json`)"])
            continue
        rows.append([stage, f"`{figures.get('model', '?')}`", *cells(figures), card.link(Path(where))])
        sources.append(Path(where).parent.name if "summary.json" in where else "committed")
    return rows, sources


def comparison_lines(card: Card, ctx: dict, sources: list[str]) -> list[str]:
    """The side-by-side comparison (`alignment.md`, committed or in `<runs>/compare`), or a line saying how to make
    it; adds its source to `sources`."""
    path = results_file(ctx["results"], "alignment.md") or results_file(ctx["runs"] / "compare", "alignment.md")
    if path is None:
        return [
            "",
            "The side-by-side comparison of the alignment methods (`alignment/compare.py --results "
            "bench/results`, which writes `bench/results/alignment.md`) has not been run: no `alignment.md`.",
        ]
    sources.append(committed(card, path) if path.parent == ctx["results"] else "compare")
    return ["", "### The alignment methods side by side", ""] + card.embed(path, "alignment")


def alignment_source(card: Card, ctx: dict, sources: list[str]) -> str:
    """The section's source line: the run folders it read, then the committed results."""
    named = sorted({s for s in sources if s != "committed" and "committed results" not in s})
    parts = [f"run folders under {card.link(ctx['runs'])} ({', '.join(named)})"] if named else []
    if "committed" in sources:
        parts.append("committed results in " + card.link(ctx["results"], "bench/results"))
    parts += [s for s in sources if "committed results" in s]
    return "; ".join(parts) or "none"


def alignment_section(card: Card, ctx: dict) -> Section:
    rows, sources = alignment_rows(card, ctx)
    body = table(["stage", "starts from", "measure", "before", "after", "figures"], rows, "lllrrl")
    body += [
        "",
        "Fine-tuning rows come from `training/finetune.py`, the rest from `alignment/` (SFT, then the "
        "reward model, DPO, PPO and GRPO from the SFT model). A row marked not run has neither a run folder nor "
        "committed results.",
    ]
    body += comparison_lines(card, ctx, sources)
    margins = ctx["runs"] / "reward" / "margins.png"
    margins = margins if margins.is_file() else results_file(ctx["results"], "reward_margins.png")
    if margins is not None:
        body += ["", f"![reward margins]({card.copy_image(margins, 'reward')})"]
    return Section("Fine-tuning, SFT and alignment", alignment_source(card, ctx, sources), body)


def compression_section(card: Card, ctx: dict) -> Section:
    body, sources = [], []
    run = ctx["run"]
    own = run / "quantization" / "quantization.md" if run is not None else None
    path = own if own is not None and own.is_file() else results_file(ctx["results"], "quantization.md")
    if path is not None:
        body += card.embed(path, "quantization")
        sources.append(f"this run ({card.link(path)})" if path == own else committed(card, path))
    else:
        body += ["No quantization results: run `tiny-hf quantize --model runs/demo`."]
    path = results_file(ctx["results"], "pruning.md")
    if path is not None:
        body += [""] + card.embed(path, "pruning")
        sources.append(committed(card, path))
    else:
        body += ["", "No pruning results: run `tiny-hf prune --model runs/demo`."]
    return Section("Quantization and pruning", "; ".join(sources) or "none", body)


def serving_section(card: Card, ctx: dict) -> Section:
    path = results_file(ctx["results"], "serve_speed_cpu.md")
    if path is None:
        return Section("Serving speed", "none", ["No serving results: run `tiny-hf bench serve-speed`."])
    figures = json.loads(path.with_suffix(".json").read_text())
    labels, ours, peer = [], [], []
    batch1 = figures.get("batch1", {})
    if batch1:
        labels += ["batch 1", "batch 1\ncompiled"]
        ours += [batch1["engine_tokens_per_s"], batch1.get("engine_compiled_tokens_per_s", 0)]
        peer += [batch1["generate_tokens_per_s"]] * 2
    for row in figures.get("throughput", []):
        labels.append(f"{row['requests']} requests")
        ours.append(row["engine_tokens_per_s"])
        peer.append(row["generate_one_by_one_tokens_per_s"])
    body = []
    if labels:
        fig = Figure(figsize=(6.5, 3), dpi=100)
        ax = fig.add_subplot()
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], peer, 0.4, label="generate()")
        ax.bar([x + 0.2 for x in xs], ours, 0.4, label="engine")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("generated tokens/s")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        body += [card.figure(fig, "serving.png", "serving speed, generate() vs the engine"), ""]
    body += card.embed(path, "serving")
    return Section("Serving speed", committed(card, path), body)


def rag_section(card: Card, ctx: dict) -> Section:
    path = results_file(ctx["results"], "rag.md")
    if path is None:
        return Section("RAG recall", "none", ["No retrieval results: run `tiny-hf bench rag`."])
    quality = json.loads(path.with_suffix(".json").read_text())["quality"]
    names = {
        "bm25": "BM25 (ours)",
        "dense": "dense MiniLM (ours)",
        "hybrid": "hybrid RRF (ours)",
        "bm25s": "bm25s (peer)",
        "st": "sentence-transformers (peer)",
    }
    rows = [
        [
            names.get(k, k),
            *(fmt(v[m]) for m in ("recall@1", "recall@5", "recall@10", "mrr@10")),
            fmt(v.get("queries_per_s"), 0),
        ]
        for k, v in quality["retrievers"].items()
    ]
    body = [
        f"{quality['queries']} held-out queries over {quality['chunks']} chunks of {quality['documents']} "
        "documents of the embedded corpus, one relevant chunk per query.",
        "",
    ]
    body += table(["retriever", "recall@1", "recall@5", "recall@10", "MRR@10", "queries/s"], rows)
    body += ["", f"BM25 speed against bm25s and exact dense search at scale: {card.link(path)}."]
    return Section("RAG recall", committed(card, path), body)


def long_context_section(card: Card, ctx: dict) -> Section:
    run = ctx["run"]
    own = run / "long_context" / "long_context.md" if run is not None else None
    path = own if own is not None and own.is_file() else results_file(ctx["results"], "long_context.md")
    if path is None:
        return Section(
            "Long context",
            "none",
            ["No long-context results: run `tiny-hf long-context --model runs/demo`."],
        )
    figures = json.loads(path.with_suffix(".json").read_text())
    variants = figures["variants"]
    names = list(variants)
    ppl = [[math.exp(v) for v in variants[n]["loss_by_position"]] for n in names]
    longest, buckets, trained = figures["longest"], len(ppl[0]), figures["trained_length"]
    edges = [round(i * longest / buckets) for i in range(buckets + 1)]
    fig = Figure(figsize=(8, 0.5 * len(names) + 1.6), dpi=100)
    ax = fig.add_subplot()
    logs = [[math.log(p) for p in row] for row in ppl]
    image = ax.imshow(logs, aspect="auto", cmap="viridis_r")
    low, high = min(map(min, logs)), max(map(max, logs))
    for i, row in enumerate(ppl):
        for j, value in enumerate(row):
            dark = (logs[i][j] - low) / ((high - low) or 1) > 0.5  # viridis_r: high perplexity is dark
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(buckets), [f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)], fontsize=8)
    ax.axvline(trained / (longest / buckets) - 0.5, color="red", linewidth=2)
    ax.set_xlabel(f"token position (red line: the trained length, {trained})")
    ax.set_title("validation perplexity by token position (lighter = lower)", fontsize=10)
    fig.colorbar(image, ax=ax, label="log perplexity")
    body = [card.figure(fig, "long_context_heatmap.png", "perplexity by position and RoPE scaling"), ""]
    body += card.embed(path, "long_context", images=False)
    source = f"this run ({card.link(path)})" if path == own else committed(card, path)
    return Section("Long context", source, body)


SECTIONS: list[Callable[[Card, dict], Section]] = [
    machine_section,
    tokenizer_section,
    training_section,
    validation_section,
    evaluation_section,
    alignment_section,
    compression_section,
    serving_section,
    rag_section,
    long_context_section,
]


# ---------------------------------------------------------------------------------------------------------------------
# Running what is missing
# ---------------------------------------------------------------------------------------------------------------------
def is_complete_run(run: Path) -> bool:
    return (run / "metrics.jsonl").is_file() and (run / "model" / "config.json").is_file()


def pretrain_run(args: CardOptions, train_out: Path) -> Path:
    """Train a run into `train_out` (quick: the tiny config; default: make demo's recipe, fewer steps); the flags
    after `--` override the recipe."""
    from training import pretrain

    recipe, steps = (QUICK_PRETRAIN, 40) if args.quick else (SMALL_PRETRAIN, 200)
    steps = args.max_steps or steps
    print(f"report: pretraining {steps} steps into {train_out}")
    defaults = {**recipe, "max_steps": steps, "seed": args.seed, "out": train_out, "resume": True}
    (options,) = parse_options(pretrain.PretrainOptions, argv=args.pretrain_args, defaults=defaults)
    pretrain.train(options)
    return train_out


def run_missing_stages(run: Path, strict: bool) -> list[str]:
    """Default mode: measure quantization and long context on `run` when its folder has no results yet. A stage that
    fails is reported and skipped (its section then falls back to committed results), unless `strict`."""
    from training import long_context, quantize

    rope = json.loads((run / "model" / "config.json").read_text()).get("position_embedding") == "rope"
    stages = [
        ("quantization", quantize, quantize.QuantizeOptions(model=run, **SMALL_QUANTIZE), True),
        ("long_context", long_context, long_context.LongContextOptions(model=str(run), **SMALL_LONG_CONTEXT), rope),
    ]
    ran = []
    for name, stage, options, applies in stages:
        if not applies or (run / name / f"{name}.json").is_file():
            continue
        print(f"report: running {name} on {run}")
        try:
            stage.run(options)
            ran.append(name.replace("_", " "))
        except Exception as error:
            if strict:
                raise
            print(f"report: {name} failed ({type(error).__name__}: {error}); using committed results", file=sys.stderr)
    return ran


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def render(sections: list[Section], title: str, elapsed: str) -> str:
    lines = [
        f"# {title}",
        "",
        "Generated by `make report` (`report/card.py`). Each section says where its "
        "figures come from: *this run* (measured from run folders on this machine) or *committed results* "
        "(`bench/results`, measured earlier on the machine they name).",
        "",
        "## Contents",
        "",
    ]
    lines += [f"{i}. [{s.title}](#{anchor(s.title)})" for i, s in enumerate(sections, start=1)]
    for section in sections:
        lines += ["", f"## {section.title}", "", f"*Source: {section.source}.*", ""]
        lines += [line.replace("{elapsed}", elapsed) for line in section.body]
    return "\n".join(lines).rstrip() + "\n"


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def clear_output(out: Path) -> None:
    """Make `out`, removing only what an earlier card wrote there: the Markdown file and its images."""
    if out.exists():
        for old in [out / REPORT_FILE, *out.glob("*.png")]:
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)


def quick_run(args: CardOptions, scratch: Path | None) -> tuple[Path, list[str], str]:
    """--quick: (the tiny run trained here, what ran, the mode line); into --train-out, else into `scratch`."""
    run = pretrain_run(args, args.train_out or scratch / "quick-run")
    mode = f"quick: a tiny model trained here for a few steps ({run.name}); the other sections are gathered"
    return run, ["pretraining (tiny, quick)"], mode


def default_run(args: CardOptions) -> tuple[Path | None, list[str], str]:
    """Default mode: (the run to report, what ran, the mode line): --run when complete, else an earlier
    `runs/report`, else one trained here (not with --gather-only); then its missing stages."""
    run, ran = args.run, []
    if not is_complete_run(run):
        train_out = args.train_out or args.runs / "report"
        if args.gather_only:
            print(f"report: {run} is not a complete run folder and --gather-only: no training sections")
            run = None
        elif is_complete_run(train_out) and not args.pretrain_args:
            run = train_out
        else:
            run = pretrain_run(args, train_out)
            ran.append("pretraining")
    if run is not None and not args.gather_only:
        ran += run_missing_stages(run, args.strict)
    mode = "default: gathered from run folders and committed results" + (
        f"; run here at a small budget: {', '.join(ran)}" if ran else ""
    )
    return run, ran, mode


def build_sections(card: Card, ctx: dict, strict: bool) -> tuple[list[Section], list[str]]:
    """Every section of `SECTIONS`, and the titles of those that failed (each then says why), unless `strict`."""
    sections, failed = [], []
    for build in SECTIONS:
        try:
            sections.append(build(card, ctx))
        except Exception as error:  # one broken source must not cost the rest of the card
            if strict:
                raise
            title = build.__name__.removesuffix("_section").replace("_", " ").capitalize()
            failed.append(title)
            print(f"report: section {title!r} failed: {type(error).__name__}: {error}", file=sys.stderr)
            sections.append(
                Section(title, "failed", [f"This section could not be built: `{type(error).__name__}: {error}`."])
            )
    return sections, failed


def main(argv: list[str] | None = None) -> dict:
    from training.report import format_duration

    args = parse_args(argv)
    started = time.perf_counter()
    clear_output(args.out)
    temporary = tempfile.TemporaryDirectory(prefix="report-run-") if args.quick and args.train_out is None else None
    scratch = Path(temporary.name) if temporary is not None else None
    try:
        run, ran, mode = quick_run(args, scratch) if args.quick else default_run(args)
        ctx = {"run": run, "runs": args.runs, "results": args.results, "mode": mode}
        card = Card(args.out, args.results, scratch)
        sections, failed = build_sections(card, ctx, args.strict)
        elapsed = time.perf_counter() - started
        title = "tiny-hf report card" + (" (quick)" if args.quick else "")
        (args.out / REPORT_FILE).write_text(render(sections, title, format_duration(elapsed)), encoding="utf-8")
    finally:  # the quick run's folder goes, whether or not the card could be written
        if temporary is not None:
            temporary.cleanup()
    print(f"report: wrote {args.out / REPORT_FILE} with {len(card.images)} images in {format_duration(elapsed)}")
    return {
        "report": args.out / REPORT_FILE,
        "sections": [s.title for s in sections],
        "images": card.images,
        "failed": failed,
        "ran": ran,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
