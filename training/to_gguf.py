"""A stock Llama model and its byte-level BPE tokenizer as one GGUF file, the format llama.cpp and its tools load.

GGUF holds the hyperparameters and the tokenizer as key-value metadata and every tensor under llama.cpp's own
names; written here with the `gguf` package (llama.cpp's own writer). Two details make it match transformers:
llama.cpp applies RoPE to interleaved pairs (x0, x1), (x2, x3), ... while transformers' Llama rotates the two halves
of each head, so the rows of the q and k projections are permuted (`interleave_rope_rows`, as llama.cpp's
`convert_hf_to_gguf.py` does); and the tokenizer is declared as GPT-2's byte-level BPE with GPT-2's pre-tokenizer,
which is the split this project's BPE uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GGUF_DTYPES = ("f32", "f16", "q8_0")
# transformers' Llama weight names -> llama.cpp's ("blk.{i}." prefixed for layers)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
TOP_TENSORS["lm_head.weight"] = "output.weight"


def interleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder a q/k projection's output rows from transformers' half-split RoPE layout to llama.cpp's pairs."""
    rows = weight.shape[0]
    # (n_head, 2, head_dim/2, in) -> (n_head, head_dim/2, 2, in): row j of each half side by side
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_llama(llama) -> None:
    """What GGUF's llama architecture cannot hold, as a ValueError naming the field."""
    config = llama.config
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters rope_type={rope['rope_type']!r}: this export writes plain RoPE only")
    if config.attention_bias or config.mlp_bias:
        raise ValueError("attention_bias/mlp_bias=True: llama.cpp's llama architecture has no projection biases")


def gguf_tensor(name: str, weight: torch.Tensor, dtype: str):
    """(data, raw type) for one tensor: norms (1-D) stay f32; matrices become f32, f16 or Q8_0 blocks of 32."""
    import gguf

    array = weight.detach().to(torch.float32).cpu().numpy()
    if array.ndim == 1 or dtype == "f32":
        return array, gguf.GGMLQuantizationType.F32
    if dtype == "f16" or array.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def add_hyperparameters(writer, config, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(dtype, gguf.LlamaFileType.MOSTLY_Q8_0))


def add_tokenizer(writer, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
    """The byte-level BPE: tokens by id (special ones as control tokens), merges, special ids and chat template."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    split = backend.get("pre_tokenizer") or {}
    gpt2_split = split.get("type") == "ByteLevel" and split.get("use_regex") and not split.get("add_prefix_space")
    if backend["model"]["type"] != "BPE" or not gpt2_split:
        raise ValueError(
            "the tokenizer is not a byte-level BPE with GPT-2's split (this project's kind); for other tokenizers "
            "run llama.cpp's convert_hf_to_gguf.py on a --format llama export"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids) | {t["id"] for t in backend["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)]
    writer.add_token_types([gguf.TokenType.UNUSED if i not in by_id else t for i, t in enumerate(types)])
    merges = backend["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(eos_ids[-1])  # end of text
    if len(eos_ids) > 1:
        writer.add_eot_token_id(eos_ids[0])  # end of turn
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # as transformers encodes: no bos added
    if tokenizer.chat_template:  # llama.cpp's template engine has no {% generation %} (a transformers extension)
        template = tokenizer.chat_template
        for tag in ("{%- generation -%}", "{%- endgeneration -%}", "{% generation %}", "{% endgeneration %}"):
            template = template.replace(tag, "")
        writer.add_chat_template(template)


def write_gguf(llama, tokenizer, path: Path, dtype: str = "f32", eos_ids: list[int] | None = None) -> Path:
    """Write `llama` (a transformers LlamaForCausalLM) and its tokenizer as one GGUF file at `path`.

    Args:
        dtype: f32, f16 or q8_0 for the matrices (norms stay f32).
        eos_ids: The ids generation stops at, end of turn first (default: the tokenizer's eos).
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {dtype}: GGUF export writes one of {', '.join(GGUF_DTYPES)}")
    check_llama(llama)
    config = llama.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    add_hyperparameters(writer, config, dtype)
    add_tokenizer(writer, tokenizer, config.vocab_size, eos_ids or [tokenizer.eos_token_id])
    for name, weight in llama.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            if rest == "self_attn.q_proj.weight":
                weight = interleave_rope_rows(weight, config.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                weight = interleave_rope_rows(weight, config.num_key_value_heads)
            target = f"blk.{layer}.{LAYER_TENSORS[rest]}"
        else:
            target = TOP_TENSORS[name]
        data, raw_type = gguf_tensor(name, weight, dtype)
        writer.add_tensor(target, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
