"""`make demo`: from nothing to a small language model that writes English about Python, on a CPU, offline.

1. training/pretrain.py builds the embedded corpus (the running Python's own documentation), trains the BPE
   tokenizer, pretrains a preset model for a few minutes with a progress bar, evaluates it and writes the run
   folder: the exported model + tokenizer, metrics, TensorBoard logs, checkpoints, loss curve and summary.
2. The exported folder is loaded back through AutoModelForCausalLM / AutoTokenizer and prompted.

Every pretraining flag can be added after `--`: `python -m training.demo -- --max-steps 1000 --model tiny-10m`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import pretrain

PROMPTS = ["The json module", "A dictionary is", "To read a file, use", "The return statement"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("runs/demo"))
    run.add_argument("--max-steps", type=int, default=600)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--fresh", action="store_true", help="delete an earlier demo run first (else it resumes)")
    sample = parser.add_argument_group("samples")
    sample.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("pretrain_args", nargs="*", help="extra training/pretrain.py flags, after --")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.fresh and args.out.exists():
        import shutil

        shutil.rmtree(args.out)
    start = time.perf_counter()
    # tiny-3m with 128-token blocks: ~2.5M tokens in ~10 minutes on 2 CPU cores, about four passes over the corpus.
    summary = pretrain.main(
        [
            "--data",
            "embedded",
            "--model",
            "tiny-3m",
            "--block-size",
            "128",
            "--batch-size",
            "32",
            "--max-steps",
            str(args.max_steps),
            "--lr",
            "3e-3",
            "--warmup-steps",
            "30",
            "--eval-every",
            "100",
            "--save-every",
            "100",
            "--seed",
            str(args.seed),
            "--out",
            str(args.out),
            "--resume",
            *args.pretrain_args,
        ]
    )
    minutes = (time.perf_counter() - start) / 60

    model_dir = args.out / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(
        f"\nReloaded {model_dir} as {type(model).__name__} ({model.num_parameters() / 1e6:.1f}M parameters) + "
        f"{type(tokenizer).__name__} ({len(tokenizer)} tokens)."
    )
    print(
        f"Validation loss {summary['val_loss']:.3f}, perplexity {summary['val_perplexity']:.1f}, "
        f"{summary['val_bits_per_byte']:.3f} bits per byte, after {minutes:.1f} minutes.\n"
    )
    torch.manual_seed(args.seed)
    samples = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.7,
            repetition_penalty=1.2,
            pad_token_id=tokenizer.pad_token_id,
        )
        samples.append(tokenizer.decode(out[0], skip_special_tokens=True))
        print(f"  {samples[-1]!r}")
    print(
        f"\nRun folder: {args.out} (summary.md, loss_curve.png, metrics.jsonl; TensorBoard: tensorboard --logdir "
        f"{args.out / 'tb'})\n"
        f"Chat with it in the browser:  python -m app.demo --model {args.out}      (http://127.0.0.1:7860)\n"
        f"Serve it (OpenAI API):        python -m app.server --model {args.out}    (http://127.0.0.1:8000/v1)"
    )
    return {**summary, "samples": samples}


if __name__ == "__main__":
    main()
