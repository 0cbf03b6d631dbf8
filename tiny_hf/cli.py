"""`tiny-hf STAGE [options]`: one command for every stage, in the order the study plan takes them.

Each stage is a module with `main(argv=None)` (`python -m training.pretrain` runs the same code); `tiny-hf STAGE
--help` shows that stage's options. The stages are named here by module path and imported only when their
subcommand runs, so `tiny-hf --help` starts in a moment and a stage loads only the libraries it needs. This file
imports nothing above tiny_hf: it is the one place the library knows the stages' names, as strings.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from . import __version__

# name -> (module with main(argv), one line for `tiny-hf --help`); grouped by the learning path's phases.
STAGES: dict[str, tuple[str, str]] = {
    # 1. Foundations: data, tokenizer, model
    "corpus": ("tiny_hf.corpus", "write the embedded corpus (pydoc topics + stdlib docstrings) to text files"),
    "tokenizer": ("training.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    # 2. Training
    "pretrain": ("training.pretrain", "pretrain a model from scratch (Accelerate; `accelerate launch -m` for more)"),
    "ablate": ("training.ablate", "compare pretraining options side by side, several seeds"),
    "eval": ("training.evaluation", "validation loss, perplexity and bits per byte of a model on a run's data"),
    "demo": ("training.demo", "the main job: corpus, tokenizer and a small model trained end to end"),
    "sft": ("alignment.sft", "supervised fine-tuning on chat data (TRL SFTTrainer)"),
    "lora": ("training.finetune", "LoRA / QLoRA fine-tuning with PEFT"),
    # 3. Alignment
    "reward": ("alignment.reward", "train a reward model on preference pairs (TRL RewardTrainer)"),
    "dpo": ("alignment.dpo", "direct preference optimisation (TRL DPOTrainer)"),
    "ppo": ("alignment.ppo", "PPO with a reward model and/or verifiable rewards (ours)"),
    "grpo": ("alignment.grpo", "GRPO or RLOO (--algo rloo) on verifiable rewards (TRL)"),
    "compare": ("alignment.compare", "one table of SFT, best-of-n, DPO, PPO, GRPO, RLOO on the same prompts"),
    # 4. Optimisation and scaling
    "quantize": ("training.quantize", "quantize a model (ours, bitsandbytes) and measure what it costs"),
    "prune": ("training.prune", "prune a model (magnitude, Wanda, 2:4, structured) and recover"),
    "long-context": ("training.long_context", "RoPE scaling variants by perplexity by position and passkey"),
    # 5. Retrieval and serving
    "index": ("rag.index", "build or update a retrieval index folder (BM25 + dense)"),
    "search": ("rag.search", "search an index: BM25, dense or hybrid"),
    "ask": ("rag.answer", "grounded answers with citations from an index and a chat model"),
    "rag-eval": ("rag.evaluate", "retrieval quality of ours against bm25s and sentence-transformers"),
    "serve": ("app.server", "the OpenAI-compatible server"),
    "chat": ("app.demo", "the Gradio app: chat, attention, tokens, ask the docs"),
    # 6. Sharing and reporting
    "export": ("training.export", "export a model: a remote-code folder or a stock Llama folder"),
    "push": ("training.push", "push a run to the Hub (model card included; --dry-run to check)"),
    "report": ("report.card", "the report card: every stage's figures in one page"),
    "bench": ("bench", "run a benchmark: tiny-hf bench NAME [options]"),
}

# name -> module of each benchmark under `tiny-hf bench`.
BENCHMARKS: dict[str, str] = {
    "tokenizer": "bench.tokenizer_bench",
    "model-speed": "bench.model_speed",
    "train-speed": "bench.train_speed",
    "serve-speed": "bench.serve_speed",
    "ppo-speed": "bench.ppo_speed",
    "attention-cost": "bench.attention_cost",
    "rag": "bench.rag_bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiny-hf",
        description=__doc__.split("\n\n")[0],
        epilog="Run `tiny-hf STAGE --help` for a stage's options.",
    )
    parser.add_argument("--version", action="version", version=f"tiny-hf {__version__}")
    commands = parser.add_subparsers(dest="stage", metavar="STAGE", title="stages")
    for name, (_, summary) in STAGES.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def run_module(module: str, prog: str, argv: list[str]):
    """Import `module` and call its `main(argv)`, with `prog` as the program name its parser prints."""
    saved, sys.argv[0] = sys.argv[0], prog
    try:
        return importlib.import_module(module).main(argv)
    finally:
        sys.argv[0] = saved


def run_bench(argv: list[str]):
    """`tiny-hf bench NAME [options]`: one benchmark, or the list of them."""
    parser = argparse.ArgumentParser(prog="tiny-hf bench", description="Run one benchmark (results: bench/results).")
    parser.add_argument("name", choices=list(BENCHMARKS), help="the benchmark")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    name = parser.parse_args(argv[:1]).name
    return run_module(BENCHMARKS[name], f"tiny-hf bench {name}", argv[1:])


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv or ["--help"])  # the help, the version, or an error for an unknown option
        return None
    if argv[0] not in STAGES:
        close = difflib.get_close_matches(argv[0], STAGES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"unknown stage {argv[0]!r}{hint}; the stages: {', '.join(STAGES)}")
    stage, rest = argv[0], argv[1:]
    if stage == "bench":
        return run_bench(rest)
    return run_module(STAGES[stage][0], f"tiny-hf {stage}", rest)


if __name__ == "__main__":
    main()
