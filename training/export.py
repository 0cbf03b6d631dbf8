"""Export a trained model to a folder other tools load.

    tiny-hf export --model runs/demo --out exports/demo                   # remote-code folder (loads without tiny_hf)
    tiny-hf export --model runs/demo --format llama --out exports/llama   # a stock LlamaForCausalLM

`hf` writes weights, config, tokenizer and the model's source files (`AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`); `llama` needs a Llama-shaped configuration (rmsnorm, rope, swiglu, pre-norm) and writes
transformers' own Llama classes, for tools that know Llama but not tiny_hf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tiny_hf.options import parse_options
from tiny_hf.runs import model_path

FORMATS = ("hf", "llama")


@dataclass
class ExportOptions:
    model: str = field(default="runs/demo", metadata={"help": "a run folder, a model folder or a Hub id"})
    out: Path = field(default=Path("exports/model"), metadata={"help": "the folder to write"})
    format: str = field(default="hf", metadata={"help": "what to write", "choices": FORMATS})


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(ExportOptions, argv=argv, description=__doc__)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tiny_hf

    try:
        path = model_path("--model", options.model)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if options.format == "hf":
        tiny_hf.export(model, tokenizer, options.out)
    else:
        try:
            llama = tiny_hf.to_llama(model)
        except (ValueError, RuntimeError) as error:
            raise SystemExit(f"error: --format llama: {str(error).splitlines()[0]}") from None
        llama.save_pretrained(options.out)
        tokenizer.save_pretrained(options.out)
    summary = {"out": str(options.out), "format": options.format}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
