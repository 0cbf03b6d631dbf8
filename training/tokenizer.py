"""Train a byte-level BPE tokenizer (tiny_hf/bpe.py) on a corpus and save it as a transformers tokenizer folder.

    tiny-hf tokenizer --out runs/tokenizer                         # the embedded corpus, 8,192 tokens
    tiny-hf tokenizer --data notes/ --vocab-size 4096 --out runs/tok

`tiny-hf pretrain` trains one itself when it is given none; this stage is the same step on its own, for reuse
across runs (`tiny-hf pretrain --tokenizer runs/tokenizer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tiny_hf.bpe import train_tokenizer
from tiny_hf.options import parse_options
from training.data import training_texts


@dataclass
class TokenizerOptions:
    data: str = field(default="embedded", metadata={"help": "a data spec, as pretrain's --data"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out share of each source (left out)"})
    cache_dir: Path = field(default=Path("data"), metadata={"help": "where the embedded corpus is cached"})
    vocab_size: int = field(default=8192, metadata={"help": "tokens in the vocabulary, special tokens included"})
    model_max_length: int = field(default=2048, metadata={"help": "the tokenizer's model_max_length"})
    out: Path = field(default=Path("runs/tokenizer"), metadata={"help": "the folder to write"})


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(TokenizerOptions, argv=argv, description=__doc__)
    if options.vocab_size < 260:
        raise SystemExit(f"error: --vocab-size {options.vocab_size} is too small: at least 260 (256 bytes + specials)")
    tokenizer = train_tokenizer(
        training_texts(options.data, options.val_fraction, options.cache_dir),
        options.vocab_size,
        options.model_max_length,
        progress=True,
    )
    tokenizer.save_pretrained(options.out)
    summary = {"out": str(options.out), "vocab_size": len(tokenizer)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
