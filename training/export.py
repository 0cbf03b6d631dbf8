"""Export a trained model to a folder or file other tools load.

    tiny-hf export --model runs/demo --out exports/demo                              # remote-code folder
    tiny-hf export --model runs/demo --format llama --out exports/llama              # a stock Llama folder
    tiny-hf export --model runs/demo --format gguf --dtype q8_0 --out exports/demo.gguf  # for llama.cpp
    tiny-hf export --model runs/lora --format adapter --out exports/adapter          # a PEFT LoRA adapter

`hf` writes weights, config, tokenizer and the model's source files (`AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` without tiny_hf). `llama` needs a Llama-shaped configuration (rmsnorm, rope, swiglu,
pre-norm, no q/k norm or sliding window) and writes transformers' own `LlamaForCausalLM` with a stock
`PreTrainedTokenizerFast`: no custom code, chat template and generation config included, so vLLM, llama.cpp's
converter and any Llama tool take it. `gguf` writes that Llama as one GGUF file (f32, f16 or q8_0 matrices) for
llama.cpp, Ollama and LM Studio. A LoRA adapter (a fine-tuning run or its `adapter/` folder) exports as the PEFT
adapter (`--format adapter`) or merged into its base in any other format. A bitsandbytes-quantized model keeps its
quantized weights, so it exports only as `hf`; for a small GGUF, export the full-precision run with `--dtype q8_0`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tiny_hf.options import parse_options
from tiny_hf.runs import model_path
from training.model_card import write_model_card

FORMATS = ("hf", "llama", "gguf", "adapter")
DTYPES = {"hf": ("f32", "f16", "bf16"), "llama": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "q8_0")}
DTYPES["adapter"] = ("f32",)


@dataclass
class ExportOptions:
    model: str = field(default="runs/demo", metadata={"help": "a run folder, a model or adapter folder, a Hub id"})
    out: Path = field(default=Path("exports/model"), metadata={"help": "the folder (or, for gguf, file) to write"})
    format: str = field(default="hf", metadata={"help": "what to write", "choices": FORMATS})
    dtype: str = field(default="f32", metadata={"help": "weights: f32, f16, bf16 (hf, llama); f32, f16, q8_0 (gguf)"})


def check_options(options: ExportOptions) -> None:
    if options.dtype not in DTYPES[options.format]:
        allowed = ", ".join(DTYPES[options.format])
        raise ValueError(f"--dtype {options.dtype}: --format {options.format} takes {allowed}")


def adapter_folder(model: str) -> Path | None:
    """The LoRA adapter folder `--model` names (itself, or a fine-tuning run's `adapter/`), else None."""
    for folder in (Path(model), Path(model) / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def check_exportable(path: str, options: ExportOptions) -> None:
    """A local model folder must have a tokenizer, and a quantized one can only be exported as it is."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a Hub id: transformers says what is missing
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"--model {options.model} has no tokenizer (tokenizer.json): an export ships one with it")
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if quantization and options.format != "hf":
        method = quantization.get("quant_method", "quantized")
        raise ValueError(
            f"--model {options.model} is quantized ({method}): its full-precision weights are gone, so it exports "
            "only as it is (--format hf, loads with bitsandbytes); for llama or gguf export the unquantized run "
            "(--format gguf --dtype q8_0 gives an 8-bit file)"
        )


def load(options: ExportOptions):
    """The model to export (an adapter merged into its base unless exporting the adapter) and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_folder(options.model)
    if options.format == "adapter" and adapter is None:
        raise ValueError(f"--format adapter: --model {options.model} is not a LoRA adapter (no adapter_config.json)")
    if adapter is not None:
        from peft import PeftConfig, PeftModel

        if not (adapter / "tokenizer_config.json").is_file():
            raise ValueError(f"--model {options.model}: the adapter folder {adapter} has no tokenizer")
        base = model_path("the adapter's base model", PeftConfig.from_pretrained(adapter).base_model_name_or_path)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        model = model if options.format == "adapter" else model.merge_and_unload()
        return model, AutoTokenizer.from_pretrained(adapter)
    path = model_path("--model", options.model)
    check_exportable(path, options)
    if options.format in ("llama", "gguf"):  # before the weights load: which fields prevent a Llama
        as_llama_config(AutoConfig.from_pretrained(path), options)
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(options.dtype, torch.float32)
    if options.format == "gguf":
        dtype = torch.float32  # quantized from full precision
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def as_llama_config(config, options: ExportOptions):
    """The LlamaConfig of a model's config (itself for a Llama); a ValueError lists every field that prevents it."""
    from tiny_hf import TinyConfig
    from tiny_hf.convert import llama_config

    if config.model_type == "llama":
        return config
    if config.model_type != TinyConfig.model_type:
        raise ValueError(f"--format {options.format}: a {config.model_type} model has no Llama form")
    try:
        return llama_config(config)
    except ValueError as error:
        raise ValueError(f"--format {options.format}: {error}") from None


def as_llama(model, options: ExportOptions):
    """A stock LlamaForCausalLM with `model`'s weights (itself when it is one)."""
    import tiny_hf

    as_llama_config(model.config, options)
    return model if model.config.model_type == "llama" else tiny_hf.to_llama(model)


def gguf_file(options: ExportOptions) -> Path:
    out = options.out
    return out if out.suffix == ".gguf" else out / f"{Path(options.model.rstrip('/')).name}.{options.dtype}.gguf"


def source_folder(model: str, out: Path) -> Path:
    """The run folder whose files describe the exported model (its card's source): a local run, model or adapter
    folder, or the export itself for a Hub id."""
    from tiny_hf.runs import resolve_model

    if adapter_folder(model) is not None:
        return Path(model)
    folders = resolve_model(model)[1]
    return folders[0] if folders else out


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(ExportOptions, argv=argv, description=__doc__)
    check_options(options)
    import tiny_hf
    from tiny_hf.chat import end_of_turn_ids
    from training.to_gguf import write_gguf

    model, tokenizer = load(options)
    written = options.out
    if options.format == "adapter":
        model.save_pretrained(options.out)
        tokenizer.save_pretrained(options.out)
    elif options.format == "hf":
        tiny_hf.save_model(model, tokenizer, options.out)
    elif options.format == "llama":
        tiny_hf.save_model(as_llama(model, options), tokenizer, options.out)
    else:
        eos = end_of_turn_ids(tokenizer) if tokenizer.chat_template else None
        written = write_gguf(as_llama(model, options), tokenizer, gguf_file(options), options.dtype, eos_ids=eos)
    if options.format != "gguf":
        write_model_card(source_folder(options.model, options.out), options.out)
    summary = {"out": str(written), "format": options.format, "dtype": options.dtype}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
