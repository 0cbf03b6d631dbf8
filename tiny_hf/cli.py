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
import os
import shutil
import sys
from pathlib import Path

from . import __version__

# name -> (module with main(argv), one line for `tiny-hf --help`); grouped by the learning path's phases.
STAGES: dict[str, tuple[str, str]] = {
    # 1. Foundations: data, tokenizer, model
    "corpus": ("tiny_hf.corpus", "write the embedded corpus (pydoc topics + stdlib docstrings) to text files"),
    "tokenizer": ("training.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "data": ("training.shards", "tokenize a data source into token shards on disk, for corpora larger than RAM"),
    "fetch": ("training.fetch", "fetch a pretrained chat model (SmolLM2-135M-Instruct) into a run folder, offline"),
    # 2. Training
    "pretrain": ("training.pretrain", "pretrain a model from scratch (Accelerate; `accelerate launch -m` for more)"),
    "ablate": ("training.ablate", "compare pretraining options side by side, several seeds"),
    "eval": ("alignment.harness", "lm-evaluation-harness: held-out bits per byte, a corpus quiz, the verifiable task"),
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
    "server-soak": "bench.server_soak",
    "speculative": "bench.speculative_bench",
    "engine-vs-llamacpp": "bench.engine_vs_llamacpp",
    "arithmetic-rl": "bench.arithmetic_rl",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiny-hf",
        description=__doc__.split("\n\n")[0],
        epilog="Run `tiny-hf STAGE --help` for a stage's options.",
    )
    parser.add_argument("--version", action="version", version=f"tiny-hf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (after the stage too)")
    commands = parser.add_subparsers(dest="stage", metavar="STAGE", title="stages")
    for name, (_, summary) in STAGES.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


# What a stage raises for input a person can fix (a bad value, a missing file or folder, a Hub id that is not
# cached): one line on stderr and exit code 2, not a traceback. `--debug` (or TINY_HF_DEBUG=1) shows the traceback.
USER_ERRORS = (ValueError, OSError)
OUTPUT_FLAGS = ("--out", "--output_dir", "--output-dir")  # the stages' output folders
CHECKPOINT_MARKERS = ("checkpoints", "checkpoint-*")  # ours, and the transformers Trainer's


def new_output_folders(argv: list[str]) -> list[Path]:
    """The output folders `argv` names that do not exist yet (so a failed start may remove them)."""
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    named += [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in OUTPUT_FLAGS and "=" in a]
    return [Path(name) for name in named if not Path(name).exists()]


def remove_failed_output(folders: list[Path]) -> None:
    """Remove the output folders a failed command created, unless it got as far as a checkpoint to resume from."""
    for folder in folders:
        if folder.is_dir() and not any(any(folder.glob(marker)) for marker in CHECKPOINT_MARKERS):
            shutil.rmtree(folder, ignore_errors=True)


def module_name(function) -> str:
    """The dotted name of `function`'s module, also when it runs as `python -m` (then named `__main__`)."""
    module = sys.modules[function.__module__]
    spec = getattr(module, "__spec__", None)
    return spec.name if function.__module__ == "__main__" and spec is not None else function.__module__


def run_main(stage_main, argv: list[str] | None = None, prog: str | None = None):
    """Run a stage's `main(argv)` as a command: an expected error (`USER_ERRORS`, or a SystemExit with a message)
    becomes `PROG: error: ...` on one line with exit code 2, and an output folder the command created is removed
    unless it holds a checkpoint. Every `tiny-hf STAGE` and `python -m` entry runs through this."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TINY_HF_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    prog = prog or f"python -m {module_name(stage_main)}"
    created = new_output_folders(argv)
    try:
        return stage_main(argv)
    except USER_ERRORS as error:
        remove_failed_output(created)
        if debug:
            raise
        reason = next(iter(str(error).strip().splitlines()), "") or type(error).__name__
        print(f"{prog}: error: {reason}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        remove_failed_output(created)
        print(f"{prog}: {stop.code.strip()}", file=sys.stderr)
        raise SystemExit(2) from None


def run_module(module: str, prog: str, argv: list[str]):
    """Import `module` and run its `main(argv)` through `run_main`, with `prog` as the name its parser prints."""
    saved, sys.argv[0] = sys.argv[0], prog
    try:
        return run_main(importlib.import_module(module).main, argv, prog)
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
    run_module(BENCHMARKS[name], f"tiny-hf bench {name}", argv[1:])


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["--debug"]:  # `tiny-hf --debug STAGE ...`: handed to the stage's run_main
        argv = [*argv[1:], "--debug"]
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv or ["--help"])  # the help, the version, or an error for an unknown option
        return None
    if argv[0] not in STAGES:
        close = difflib.get_close_matches(argv[0], STAGES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"unknown stage {argv[0]!r}{hint}; the stages: {', '.join(STAGES)}")
    stage, rest = argv[0], argv[1:]
    if stage == "bench":
        run_bench(rest)
    else:
        run_module(STAGES[stage][0], f"tiny-hf {stage}", rest)
    return 0  # the console script exits with this; a stage's result stays in its output folder


if __name__ == "__main__":
    main()
