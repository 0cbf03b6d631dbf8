"""TinyConfig: every architectural choice of a tiny-hf model, as serializable primitives.

Field names follow transformers (`hidden_size`, `num_key_value_heads`, `rope_parameters`, ...) so that tooling that
reads a config by convention (PEFT target modules, TRL, vLLM's Llama mapping via `to_llama`) finds what it expects.
Each component is chosen by a string and validated here, so a typo fails at construction time with the allowed
values, never deep inside a forward pass.
"""

from __future__ import annotations

import difflib
from typing import Any

from transformers import PretrainedConfig

# The allowed values of each variant field. modeling_tiny.py keys its component dicts by exactly these strings.
POSITION_EMBEDDINGS = ("none", "sinusoidal", "learned", "rope", "alibi")
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("gelu", "relu2", "swiglu", "geglu", "reglu")
BLOCK_TYPES = ("pre_norm", "post_norm", "parallel")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

# Named shapes. Each entry only overrides TinyConfig's defaults (rope, rmsnorm, swiglu, pre_norm: a modern Llama-like
# block); `TinyConfig.from_preset(name).num_parameters()` gives the count listed in the README.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1M: the smallest model that still learns English-looking text from the embedded corpus in a few minutes.
    "tiny-1m": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4),
    # ~3M: `make demo`'s default size on a 2-core CPU.
    "tiny-3m": dict(vocab_size=8192, hidden_size=160, num_hidden_layers=6, num_attention_heads=5),
    "tiny-10m": dict(vocab_size=8192, hidden_size=288, num_hidden_layers=8, num_attention_heads=6),
    "tiny-30m": dict(
        vocab_size=8192, hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4
    ),
    # The Llama recipe at ~60M: GQA, untied embeddings, a 32k vocabulary. `to_llama` converts it losslessly.
    "llama-60m": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # GPT-2 small (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases, 50k vocabulary, 124M.
    "gpt2-small": dict(
        vocab_size=50304,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
        position_embedding="learned",
        norm="layernorm",
        mlp="gelu",
        attention_bias=True,
        mlp_bias=True,
        norm_eps=1e-5,
    ),
}


def _default_intermediate_size(hidden_size: int, mlp: str) -> int:
    # Plain MLPs use 4x (Vaswani et al. 2017). Gated MLPs have three matrices instead of two, so 2/3 of 4x keeps the
    # parameter count equal (Shazeer 2020); rounded up to a multiple of 32 for efficient matmuls.
    if mlp in ("gelu", "relu2"):
        return 4 * hidden_size
    return 32 * ((8 * hidden_size // 3 + 31) // 32)


def unknown_preset(name: str) -> str:
    """The message for a preset name that is not one: the presets, and the closest one if any is close."""
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown preset {name!r}{hint}; the presets: {', '.join(PRESETS)}"


class TinyConfig(PretrainedConfig):
    """Configuration of a tiny-hf decoder-only transformer.

    Args:
        vocab_size: Number of token ids the embedding and the LM head cover.
        hidden_size: Width of the residual stream.
        intermediate_size: Hidden width of the MLP; None picks 4x (plain) or 8/3x (gated) `hidden_size`.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Query heads per attention layer.
        num_key_value_heads: Key/value heads: equal to `num_attention_heads` for multi-head attention, fewer for
            grouped-query attention (GQA), 1 for multi-query attention (MQA). None means equal.
        head_dim: Width of one head; None means `hidden_size // num_attention_heads`.
        max_position_embeddings: Longest sequence the position embedding is built for (learned/sinusoidal tables,
            the RoPE scaling reference length).
        position_embedding: One of "none" (NoPE: only the causal mask orders tokens), "sinusoidal", "learned",
            "rope", "alibi".
        norm: "layernorm" or "rmsnorm".
        qk_norm: Normalise queries and keys per head before the dot product (OLMo 2, Qwen3): tames attention logit
            growth.
        mlp: "gelu", "relu2", "swiglu", "geglu" or "reglu".
        block: "pre_norm" (GPT-2, Llama), "post_norm" (the original Transformer) or "parallel" (GPT-J, PaLM).
        rope_parameters: transformers' RoPE dict: {"rope_type": "default"|"linear"|"dynamic"|"yarn",
            "rope_theta": float, "factor": float, ...}. The legacy `rope_theta=` and `rope_scaling=` keyword
            arguments are accepted and folded into it.
        sliding_window: If set, each token attends to at most this many most recent tokens (itself included).
        attention_bias: Biases on the q/k/v/o projections.
        mlp_bias: Biases on the MLP projections.
        norm_eps: Epsilon of the norms.
        attention_dropout: Dropout on the attention probabilities (training only).
        hidden_dropout: Dropout on the embeddings and on each residual branch (training only).
        initializer_range: Standard deviation of the normal initialisation of matrices and embeddings.
        tie_word_embeddings: Share the input embedding matrix with the LM head (Press & Wolf 2017).
        logit_softcap: If set, the LM head's logits are `c * tanh(logits / c)` for this c (Gemma 2, Gemma Team 2024;
            modded-nanogpt uses 30 then 15): bounded logits keep early training from overconfident spikes.
        zero_init_output: Initialise every residual branch's output projection (`o_proj`, `down_proj`) at zero, and
            an untied `lm_head` too (modded-nanogpt, after ReZero/Fixup): each block starts as the identity.
        use_cache: Whether forward returns a KV cache by default.
        pad_token_id, bos_token_id, eos_token_id: Special token ids, matching the tokenizer.
    """

    model_type = "tiny"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 512,
        position_embedding: str = "rope",
        norm: str = "rmsnorm",
        qk_norm: bool = False,
        mlp: str = "swiglu",
        block: str = "pre_norm",
        rope_parameters: dict | None = None,
        sliding_window: int | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        logit_softcap: float | None = None,
        zero_init_output: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = 2,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or _default_intermediate_size(hidden_size, mlp)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or (hidden_size // num_attention_heads if num_attention_heads else None)
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding = position_embedding
        self.norm = norm
        self.qk_norm = qk_norm
        self.mlp = mlp
        self.block = block
        rope_parameters = rope_parameters or kwargs.get("rope_scaling")
        if position_embedding == "rope":
            # The base class folds `rope_theta=`/`rope_scaling=` from kwargs into this dict and standardises it.
            self.rope_parameters = dict(rope_parameters or {})
        self.sliding_window = sliding_window
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.norm_eps = norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        # transformers 5 no longer declares these on the base config: without them weights are silently untied.
        self.tie_word_embeddings = tie_word_embeddings
        self.logit_softcap = logit_softcap
        self.zero_init_output = zero_init_output
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # Our checks run first, so a bad value is reported by name rather than by a base-class validator.
        self.check_variants(rope_parameters or {})
        super().__init__(**kwargs)
        if position_embedding == "rope":
            self.rope_parameters.pop("type", None)  # a legacy alias of "rope_type", already copied there
        else:
            # No RoPE: no rope_parameters, so transformers' RoPE validators (even head_dim, ...) do not apply.
            self.rope_parameters = None

    def check_variants(self, rope_parameters: dict | None = None) -> None:
        """Raise a ValueError naming the field, its value and what is allowed, for any inconsistent setting.

        Args:
            rope_parameters: The RoPE dict to check; defaults to `self.rope_parameters`.
        """
        for field, allowed in (
            ("position_embedding", POSITION_EMBEDDINGS),
            ("norm", NORM_TYPES),
            ("mlp", MLP_TYPES),
            ("block", BLOCK_TYPES),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {sorted(allowed)}")
        for field in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.position_embedding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim={self.head_dim} is odd, but position_embedding='rope' rotates pairs of dimensions"
            )
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be None or a positive integer")
        for field in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{field}={value!r} must be in [0, 1)")
        if self.logit_softcap is not None and (
            isinstance(self.logit_softcap, bool)
            or not isinstance(self.logit_softcap, (int, float))
            or self.logit_softcap <= 0
        ):
            raise ValueError(f"logit_softcap={self.logit_softcap!r} must be None or a positive number")
        if not isinstance(self.zero_init_output, bool):
            raise ValueError(f"zero_init_output={self.zero_init_output!r} must be true or false")
        rope = rope_parameters if rope_parameters is not None else (self.rope_parameters or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters['rope_type']={rope_type!r} is not one of {sorted(ROPE_TYPES)}")
        if rope_type != "default":
            if self.position_embedding != "rope":
                raise ValueError(
                    f"rope_parameters['rope_type']={rope_type!r} needs position_embedding='rope', "
                    f"not {self.position_embedding!r}"
                )
            factor = rope.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1.0:
                raise ValueError(
                    f"rope_parameters['factor']={factor!r} must be a number >= 1 for rope_type={rope_type!r}"
                )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TinyConfig:
        """Build a named configuration (see `PRESETS`), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(unknown_preset(name))
        return cls(**{**PRESETS[name], **overrides})

    @property
    def is_llama_shaped(self) -> bool:
        """True when the architecture is exactly transformers' Llama (so `to_llama` is lossless)."""
        return (
            self.position_embedding == "rope"
            and self.norm == "rmsnorm"
            and self.mlp == "swiglu"
            and self.block == "pre_norm"
            and not self.qk_norm
            and self.sliding_window is None
            and self.logit_softcap is None
        )
