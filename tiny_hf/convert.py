"""Leaving and entering tiny_hf: a stock `LlamaForCausalLM` for Llama tooling and back (`from_llama`, so the engine
runs Llama-family checkpoints such as SmolLM2), and a self-contained remote-code folder.

`to_llama` is lossless for the Llama-shaped configuration (rmsnorm, rope, swiglu, pre_norm, no q/k norm, no
sliding window, no logit soft-cap), because the state dict is key for key Llama's. `export` writes weights, config,
tokenizer and the model's source files, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works
where tiny_hf is not installed (a Hub repo pushed from that folder too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .chat import chat_generation_config
from .configuration_tiny import ROPE_TYPES, TinyConfig
from .modeling_tiny import TinyForCausalLM, TinyRotaryEmbedding

PACKAGE_DIR = Path(__file__).parent
# The files an exported folder needs: the model imports only its configuration; the tokenizer stands alone.
REMOTE_CODE_FILES = ("configuration_tiny.py", "modeling_tiny.py", "tokenization_tiny.py")
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizerFast"]}
AUTO_MAP = {
    "AutoConfig": "configuration_tiny.TinyConfig",
    "AutoModel": "modeling_tiny.TinyModel",
    "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
    "AutoModelForSequenceClassification": "modeling_tiny.TinyForSequenceClassification",
    **TOKENIZER_AUTO_MAP,
}


# TinyConfig field -> LlamaConfig field, both ways (to_llama, from_llama); the rest is fixed by the Llama shape.
LLAMA_FIELDS = {
    **{
        name: name
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "initializer_range",
            "attention_bias",
            "attention_dropout",
            "mlp_bias",
            "tie_word_embeddings",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        )
    },
    "norm_eps": "rms_norm_eps",
}


def llama_config(config: TinyConfig) -> LlamaConfig:
    """The `LlamaConfig` of a Llama-shaped `TinyConfig`; a ValueError lists every field that has no Llama match."""
    wanted = {"position_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "block": "pre_norm"}
    problems = [
        f"{k}={getattr(config, k)!r} (Llama needs {v!r})" for k, v in wanted.items() if getattr(config, k) != v
    ]
    if config.qk_norm:
        problems.append("qk_norm=True (Llama has no q/k norm)")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window} (Llama attends to the whole context)")
    if config.logit_softcap is not None:
        problems.append(f"logit_softcap={config.logit_softcap} (Llama's logits are not soft-capped)")
    if problems:
        raise ValueError("this model is not Llama-shaped: " + "; ".join(problems))
    fields = {llama: getattr(config, tiny) for tiny, llama in LLAMA_FIELDS.items()}
    return LlamaConfig(**fields, hidden_act="silu", rope_parameters=dict(config.rope_parameters))


def to_llama(model: PreTrainedModel) -> LlamaForCausalLM:
    """A stock transformers `LlamaForCausalLM` with this model's weights (same logits), for vLLM, llama.cpp's
    converter and other tooling that knows Llama but not tiny_hf.

    Args:
        model: A `TinyForCausalLM` with a Llama-shaped config.
    """
    llama = LlamaForCausalLM(llama_config(model.config)).to(model.dtype)
    llama.load_state_dict(model.state_dict(), strict=True)  # strict: the key sets must match exactly
    llama.generation_config = model.generation_config
    return llama.train(model.training).to(model.device)


LLAMA_FAMILY = ("llama", "mistral")  # the model types whose weights and config map one to one onto a TinyConfig


def tiny_config_from_llama(config) -> TinyConfig:
    """The `TinyConfig` of a Llama-family config (rmsnorm, rope, swiglu, pre_norm); a ValueError names what differs."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    problems = []
    if config.model_type not in LLAMA_FAMILY:
        problems.append(f"model_type={config.model_type!r} (one of {list(LLAMA_FAMILY)} is needed)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (swiglu needs 'silu')")
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        problems.append(f"rope_type={rope.get('rope_type')!r} (tiny_hf has {list(ROPE_TYPES)})")
    if problems:
        raise ValueError("this model cannot become a TinyForCausalLM: " + "; ".join(problems))
    fields = {tiny: getattr(config, llama) for tiny, llama in LLAMA_FIELDS.items() if hasattr(config, llama)}
    fields["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return TinyConfig(**fields, rope_parameters=rope, sliding_window=getattr(config, "sliding_window", None))


def from_llama(model: PreTrainedModel) -> TinyForCausalLM:
    """A `TinyForCausalLM` sharing a Llama-family model's weights (no copy), with the same logits: the inverse of
    `to_llama`, so tiny_hf's engine can serve real checkpoints (SmolLM2, TinyLlama, Mistral-shaped models).

    Args:
        model: A `LlamaForCausalLM` (or `MistralForCausalLM`) from transformers.
    """
    config = tiny_config_from_llama(model.config)
    with torch.device("meta"):
        tiny = TinyForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied: one tensor under both names
    tiny.load_state_dict(state, strict=True, assign=True)  # assign: the same tensors, no copy of the weights
    if config.tie_word_embeddings:
        tiny.lm_head.weight = tiny.model.embed_tokens.weight
    tiny.model.rotary_emb = TinyRotaryEmbedding(config).to(model.device)  # buffers, not in the state dict
    tiny.generation_config = model.generation_config
    tiny.config._name_or_path = model.config._name_or_path
    return tiny.train(model.training).to(model.device)


def engine_ready(model: PreTrainedModel) -> PreTrainedModel:
    """`model` as the engine runs it: itself when it is a TinyForCausalLM, `from_llama(model)` when it is
    Llama-family, else a TypeError that says to use `generate()`."""
    from .engine import Engine

    if Engine.supports(model):
        return model
    if getattr(getattr(model, "config", None), "model_type", None) in LLAMA_FAMILY:
        return from_llama(model)
    raise TypeError(
        f"the engine runs TinyForCausalLM and Llama-family models ({list(LLAMA_FAMILY)}); "
        f"{type(model).__name__} is neither: use model.generate() for this one"
    )


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Write a folder that loads with `trust_remote_code=True` without tiny_hf: safetensors weights, a config whose
    `auto_map` names every Auto class (AutoConfig, AutoModel, AutoModelForCausalLM,
    AutoModelForSequenceClassification, AutoTokenizer), the tokenizer, and the source files they point to.

    Args:
        model: A tiny_hf model (any head).
        tokenizer: Its `TinyTokenizerFast`, or None to export weights only.
        out_dir: The folder to write (created if missing).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = getattr(model.config, "auto_map", None)
    model.config.auto_map = dict(AUTO_MAP)
    try:
        model.save_pretrained(out_dir)
    finally:
        model.config.auto_map = previous
    if tokenizer is not None:
        export_tokenizer(tokenizer, out_dir)
        save_generation_config(model, tokenizer, out_dir)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(PACKAGE_DIR / name, out_dir / name)
    return out_dir


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Save a trained model and its tokenizer the one way every script here does: a tiny_hf model through `export`
    (the folder then loads with or without tiny_hf installed), any other model with its own `save_pretrained`."""
    if getattr(model.config, "model_type", None) == TinyConfig.model_type:
        return export(model, tokenizer, out_dir)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        save_stock_tokenizer(tokenizer, out_dir)
        save_generation_config(model, tokenizer, out_dir)
    return out_dir


def save_stock_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save a tokenizer beside a stock model (a Llama export, a GPT-2 fine-tune) so that it needs no custom code
    either: a `TinyTokenizerFast` is written as transformers' own `PreTrainedTokenizerFast`, which behaves the same
    (the subclass adds no behaviour, only a constructor for tiny_hf's BPE), so llama.cpp's converter and any tool
    that refuses remote code load it."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    if type(tokenizer).__name__ == "TinyTokenizerFast":
        update_tokenizer_config(out_dir, tokenizer_class="PreTrainedTokenizerFast", auto_map=None)
    return out_dir


def update_tokenizer_config(out_dir: Path, **changes) -> None:
    """Set (None: remove) keys of a saved tokenizer's tokenizer_config.json."""
    path = Path(out_dir) / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """A chat-capable model's generation_config.json: it stops at the end of the turn (`chat_generation_config`)."""
    config = chat_generation_config(model, tokenizer)
    if config is not None:
        config.save_pretrained(out_dir)


def export_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save a `TinyTokenizerFast` so that `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` loads it
    without tiny_hf: its files, an `auto_map` in tokenizer_config.json, and tokenization_tiny.py beside them.
    (Unlike `register_for_auto_class`, this changes no class for the rest of the process.)"""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    update_tokenizer_config(out_dir, auto_map=TOKENIZER_AUTO_MAP)
    shutil.copyfile(PACKAGE_DIR / "tokenization_tiny.py", out_dir / "tokenization_tiny.py")
    return out_dir
