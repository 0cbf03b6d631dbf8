"""`make demo`: the whole path from nothing to a model that loads through transformers' Auto classes.

1. Build the embedded corpus (the running Python's own documentation; no network).
2. Train the from-scratch byte-level BPE tokenizer on its training split.
3. Build a model from a preset and export it (weights, config, tokenizer, source files) as a run folder.
4. Reload that folder with AutoModelForCausalLM / AutoTokenizer and generate.

The model is untrained here: the pretraining step (training/pretrain.py) slots in between 3 and 4.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_hf import TinyConfig, TinyForCausalLM, export
from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import iter_texts, write_corpus


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=Path("data/corpus"), help="where the embedded corpus is written")
    data.add_argument("--vocab-size", type=int, default=8192)
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="tiny-3m", help="a TinyConfig preset")
    model.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/demo"))
    out.add_argument("--prompt", default="The json module")
    out.add_argument("--max-new-tokens", type=int, default=30)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    meta = write_corpus(args.data)
    print(
        f"[1/4] corpus: {meta['train']['documents']} train / {meta['validation']['documents']} validation "
        f"documents in {args.data} ({time.perf_counter() - start:.1f} s)"
    )

    start = time.perf_counter()
    tokenizer = train_tokenizer(iter_texts(args.data / "train.jsonl"), vocab_size=args.vocab_size)
    print(f"[2/4] tokenizer: {len(tokenizer)} tokens, trained in {time.perf_counter() - start:.1f} s")

    config = TinyConfig.from_preset(args.preset, vocab_size=len(tokenizer))
    model = TinyForCausalLM(config)
    model_dir = export(model, tokenizer, args.out / "model")
    print(f"[3/4] model: {args.preset}, {model.num_parameters() / 1e6:.1f}M parameters, exported to {model_dir}")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    sample = tokenizer.decode(output[0], skip_special_tokens=True)
    print(f"[4/4] reloaded as {type(model).__name__} + {type(tokenizer).__name__}; untrained sample:\n  {sample!r}")
    return {"model_dir": str(model_dir), "sample": sample, "parameters": model.num_parameters()}


if __name__ == "__main__":
    main()
