"""A from-scratch decoder-only transformer whose every part is chosen by a string in `TinyConfig`.

Read it bottom-up, like transformers' `modeling_llama.py`: norms, position embeddings, MLPs, the attention kernels
and mask, attention, blocks, then the models. Each family of variants is a module-level dict keyed by the config
string (`NORMS[config.norm]`, `MLPS[config.mlp]`, `BLOCKS[config.block]`, ...). Weight names are transformers'
(`embed_tokens`, `q_proj`, `o_proj`, `gate_proj`, `input_layernorm`, `lm_head`), so the Llama-shaped configuration
has exactly `LlamaForCausalLM`'s state dict.

This file and `configuration_tiny.py` are copied next to exported weights and run with `trust_remote_code=True`
where tiny_hf is not installed: import only torch, transformers and sibling files here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from .configuration_tiny import TinyConfig

# transformers 5.24 renamed the KV-cache output field from `past_key_values` to `cache`; an exported model runs on
# whatever version its user has, so outputs are built with the field the installed class declares.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ---------------------------------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------------------------------
class TinyLayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016): subtract the mean, divide by the standard deviation over the hidden dimension,
    then scale and shift. Keeps every token's activations at a fixed scale whatever the depth."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x - mean) / sqrt(var + eps) * weight + bias, fused by torch.
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class TinyRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): divide by the root mean square, then scale; no mean, no bias.
    As good as LayerNorm in practice and cheaper, hence Llama's choice. Computed in float32 for stability."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


NORMS: dict[str, type[nn.Module]] = {"layernorm": TinyLayerNorm, "rmsnorm": TinyRMSNorm}


# ---------------------------------------------------------------------------------------------------------------------
# Position embeddings. Absolute ones are added to the token embeddings; RoPE rotates queries and keys; ALiBi biases
# the attention scores. "none" (NoPE) relies on the causal mask alone to tell positions apart.
# ---------------------------------------------------------------------------------------------------------------------
def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed encoding of Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (ceil(d/2),)
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


class TinySinusoidalPositionEmbedding(nn.Module):
    """Sinusoidal absolute positions (Vaswani et al. 2017): a fixed table, no parameters; relative offsets are linear
    functions of the encodings, which the original paper hoped would let attention generalise to longer inputs."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.register_buffer(
            "table", sinusoidal_table(config.max_position_embeddings, config.hidden_size), persistent=False
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]  # (B, T, hidden)


class TinyLearnedPositionEmbedding(nn.Module):
    """Learned absolute positions (GPT-2, Radford et al. 2019): one trained vector per position, so the model cannot
    run past `max_position_embeddings`."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.max_position_embeddings, config.hidden_size))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(position_ids, self.weight)  # (B, T, hidden)


ABSOLUTE_POSITIONS: dict[str, type[nn.Module]] = {
    "sinusoidal": TinySinusoidalPositionEmbedding,
    "learned": TinyLearnedPositionEmbedding,
}


def _rope_default(config: TinyConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """RoPE frequencies (Su et al. 2021): pair i of a head rotates by angle p * theta^(-2i/d) at position p."""
    dim, base = config.head_dim, config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0


def _rope_linear(config: TinyConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Position Interpolation (Chen et al. 2023): divide every frequency by `factor`, squeezing `factor` times more
    positions into the angle range seen in training."""
    inv_freq, _ = _rope_default(config)
    return inv_freq / config.rope_parameters["factor"], 1.0


def _rope_dynamic(config: TinyConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK scaling (bloc97/emozilla 2023): past the trained length, raise the base theta so that low
    frequencies interpolate while high ones (local order) stay intact; unchanged within the trained length."""
    params, dim = config.rope_parameters, config.head_dim
    max_len = config.max_position_embeddings
    seq_len = max(seq_len or max_len, max_len)
    factor = params["factor"]
    base = params["rope_theta"] * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0


def _rope_yarn(config: TinyConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate only the low-frequency pairs (those that rotate less than `beta_slow`
    times over the trained window), keep the high-frequency ones, ramp linearly in between, and scale attention
    logits by 0.1 ln(factor) + 1 to undo the entropy change of longer contexts."""
    params, dim = config.rope_parameters, config.head_dim
    base, factor = params["rope_theta"], params["factor"]
    original_max = params.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
    attention_factor = params.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(num_rotations: float) -> float:
        # The pair index whose wavelength fits `num_rotations` times into the original window.
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    # ramp = 0: high frequency, keep (extrapolate); ramp = 1: low frequency, interpolate by `factor`.
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    return inv_freq, attention_factor


ROPE_SCALINGS: dict[str, Callable[[TinyConfig, int | None], tuple[torch.Tensor, float]]] = {
    "default": _rope_default,
    "linear": _rope_linear,
    "dynamic": _rope_dynamic,
    "yarn": _rope_yarn,
}


class TinyRotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotating q and k by position-dependent angles makes their dot
    product depend only on the relative offset. Returns the cos/sin tables for the given positions; the rope type
    in `config.rope_parameters` picks how frequencies are scaled for contexts longer than training."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        inv_freq, self.attention_scaling = ROPE_SCALINGS[self.rope_type](config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope_type == "dynamic":
            # Recomputed from the longest position in this call: the same positions always get the same angles.
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = ROPE_SCALINGS["dynamic"](self.config, seq_len)[0].to(x.device)
        freqs = position_ids[..., None].float() * inv_freq.to(x.device)  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim): pair i is (i, i + head_dim/2)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90-degree turn of every pair."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by the angles in cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence 2^(-8/n), 2^(-16/n), ...; for a head count that
    is not a power of two, the slopes of the next power of two are interleaved, as in the paper's code."""

    def power_of_2_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_2_slopes(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_2_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_2_slopes(closest) + extra)


# ---------------------------------------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------------------------------------
def mark_zero_init(config: TinyConfig, linear: nn.Linear) -> nn.Linear:
    """Mark a residual branch's output projection to start at zero when `config.zero_init_output` (modded-nanogpt):
    the block then begins as the identity. `_init_weights` reads the mark; weights loaded from a checkpoint stay."""
    linear.zero_init = config.zero_init_output
    return linear


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """ReLU(x)^2 (So et al. 2021, "Primer"): as cheap as ReLU, trains like GELU or better."""
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation ("gelu_new")
    "relu": F.relu,
    "relu2": relu_squared,
    "silu": F.silu,
}

# config.mlp -> (gated, activation). Gated variants compute act(gate_proj(x)) * up_proj(x) (Shazeer 2020, "GLU
# Variants Improve Transformer"): SwiGLU is Llama's, GeGLU Gemma's; plain ones compute act(up_proj(x)).
MLPS: dict[str, tuple[bool, str]] = {
    "gelu": (False, "gelu"),
    "relu2": (False, "relu2"),
    "swiglu": (True, "silu"),
    "geglu": (True, "gelu"),
    "reglu": (True, "relu"),
}


class TinyMLP(nn.Module):
    """The position-wise feed-forward network (Vaswani et al. 2017): widen, apply a nonlinearity, project back.
    Attention mixes information across positions; this is where each position's features are transformed."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.gated, activation = MLPS[config.mlp]
        self.act_fn = ACTIVATIONS[activation]
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = mark_zero_init(
            config, nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


# ---------------------------------------------------------------------------------------------------------------------
# Attention kernels. Both take q (B, H, Q, D), k and v (B, Hkv, K, D), an additive bias broadcastable to (B, H, Q, K)
# or None, and return (output (B, Q, H, D), attention probabilities or None).
# ---------------------------------------------------------------------------------------------------------------------
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, K, D) -> (B, Hkv * n_rep, K, D): each key/value head serves `n_rep` query heads (GQA/MQA)."""
    if n_rep == 1:
        return x
    b, h_kv, k, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, k, d).reshape(b, h_kv * n_rep, k, d)


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scaling: float,
    dropout: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention written out (Vaswani et al. 2017): softmax(q k^T / sqrt(d) + bias) v."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Q, K)
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    if bias is not None:
        scores = scores + bias
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2), probs  # (B, Q, H, D)


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scaling: float,
    dropout: float,
    is_causal: bool,
) -> tuple[torch.Tensor, None]:
    """The same computation through torch's fused `scaled_dot_product_attention` (flash/memory-efficient kernels):
    no (Q, K) probability matrix is kept, so it is faster and lighter, but cannot return the probabilities."""
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=bias,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2), None  # (B, Q, H, D)


ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
}


def attention_bias(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    *,
    sliding_window: int | None,
    slopes: torch.Tensor | None,
    dtype: torch.dtype,
    same_document: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive attention bias (B, 1 or H, Q, K) from the positions of the queries (B, Q) and of the keys (B, K),
    where a key position of -1 marks an empty or padding key. The one mask of the model and the inference engine.

    A query sees a key when the key is written, not after it (causal), within `sliding_window`, and in the same
    document (`same_document` (B, Q, K), for packed rows); ALiBi (Press et al. 2022) adds -slope x distance.
    """
    qp, kp = query_positions[:, :, None], key_positions[:, None, :]  # (B, Q, 1), (B, 1, K)
    allowed = (kp >= 0) & (kp <= qp)  # (B, Q, K)
    if sliding_window is not None:
        allowed = allowed & (qp - kp < sliding_window)
    if same_document is not None:
        allowed = allowed & same_document
    minimum = torch.finfo(dtype).min
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, minimum)[:, None]
    if slopes is not None:
        distance = (qp - kp).clamp(min=0).to(dtype)[:, None]  # (B, 1, Q, K)
        bias = (bias - slopes.to(dtype)[None, :, None, None] * distance).clamp(min=minimum)  # (B, H, Q, K)
    return bias


def build_attention_bias(
    *,
    batch_size: int,
    query_length: int,
    past_length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    sliding_window: int | None,
    slopes: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The bias of a `forward` over cache slots [0, past + Q): `attention_bias` with slot numbers as positions, padding
    keys (`attention_mask` 0) empty, and, in a packed batch without cache, documents kept apart (positions restart
    at 0). None when plain causal attention is exact (then the kernels use their fused causal path). Attention layers
    slice the last K columns: a sliding-window cache returns only the most recent keys."""
    total = past_length + query_length
    padded = attention_mask is not None and not bool(attention_mask.all())
    packed = (
        past_length == 0 and position_ids is not None and query_length > 1 and bool((position_ids[:, 1:] == 0).any())
    )
    windowed = sliding_window is not None and total > sliding_window
    if not (padded or packed or windowed or slopes is not None) and (past_length == 0 or query_length == 1):
        return None
    query_slots = torch.arange(past_length, total, device=device)[None]  # (1, Q)
    key_slots = torch.arange(total, device=device)[None]  # (1, total)
    if padded:
        key_slots = key_slots.masked_fill(~attention_mask[:, -total:].bool(), -1)  # (B, total)
    same_document = None
    if packed:
        document = (position_ids == 0).cumsum(-1)  # (B, T): index of the document each token belongs to
        same_document = document[:, :, None] == document[:, None, :]  # (B, Q, total)
    bias = attention_bias(
        query_slots,
        key_slots,
        sliding_window=sliding_window if windowed else None,
        slopes=slopes,
        dtype=dtype,
        same_document=same_document,
    )
    return bias.expand(batch_size, -1, -1, -1) if bias.shape[0] == 1 and batch_size > 1 else bias


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------
class TinyAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017) with grouped key/value heads: GQA (Ainslie et al. 2023)
    when 1 < num_key_value_heads < num_attention_heads, MQA (Shazeer 2019) when it is 1. Optional per-head q/k
    norm (Dehghani et al. 2023) and RoPE; the KV cache stores keys after RoPE."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = mark_zero_init(
            config, nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        )
        if config.qk_norm:
            self.q_norm = NORMS[config.norm](self.head_dim, eps=config.norm_eps)
            self.k_norm = NORMS[config.norm](self.head_dim, eps=config.norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        attention_bias: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)  # (B, H, Q, D)
        k = self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, Q, D)
        v = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, Q, D)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if position_embeddings is not None:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, K, D): past keys followed by these

        if attention_bias is not None:
            attention_bias = attention_bias[..., -k.shape[2] :]  # the slots of the keys the cache returned
        # Fused causal attention is exact only when queries and keys are the same slots.
        is_causal = attention_bias is None and q_len > 1 and q_len == k.shape[2]
        attend = ATTENTION_FUNCTIONS["eager" if output_attentions else self.config._attn_implementation or "sdpa"]
        out, probs = attend(
            q,
            k,
            v,
            attention_bias,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.o_proj(out.reshape(batch, q_len, -1)), probs  # (B, Q, hidden)


# ---------------------------------------------------------------------------------------------------------------------
# Blocks. All take (hidden_states, **attention kwargs) and return (hidden_states, attention probabilities or None).
# ---------------------------------------------------------------------------------------------------------------------
class TinyBlock(GradientCheckpointingLayer):
    """The parts every block has: attention, MLP, the first norm and residual dropout. Subclasses decide where the
    norms and residual connections go."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TinyAttention(config, layer_idx)
        self.mlp = TinyMLP(config)
        self.input_layernorm = NORMS[config.norm](config.hidden_size, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)


class TinyPreNormBlock(TinyBlock):
    """Pre-norm (GPT-2, Llama; Xiong et al. 2020): x + f(norm(x)). The residual path stays an identity, so
    gradients reach early layers undiminished and deep stacks train without warmup tricks."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.post_attention_layernorm = NORMS[config.norm](config.hidden_size, eps=config.norm_eps)

    def forward(self, hidden_states: torch.Tensor, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, probs = self.self_attn(self.input_layernorm(hidden_states), **attn_kwargs)
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, probs


class TinyPostNormBlock(TinyBlock):
    """Post-norm (the original Transformer, Vaswani et al. 2017): norm(x + f(x)). Normalising the residual stream
    itself makes gradients shrink with depth, which is why it needs learning-rate warmup (Xiong et al. 2020)."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.post_attention_layernorm = NORMS[config.norm](config.hidden_size, eps=config.norm_eps)

    def forward(self, hidden_states: torch.Tensor, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, probs = self.self_attn(hidden_states, **attn_kwargs)
        hidden_states = self.input_layernorm(hidden_states + self.dropout(attn_out))
        hidden_states = self.post_attention_layernorm(hidden_states + self.dropout(self.mlp(hidden_states)))
        return hidden_states, probs


class TinyParallelBlock(TinyBlock):
    """Parallel attention and MLP (GPT-J, Wang & Komatsuzaki 2021; PaLM, Chowdhery et al. 2022):
    x + attn(norm(x)) + mlp(norm(x)) with one shared norm. Both branches can run at once: ~15% faster at scale."""

    def forward(self, hidden_states: torch.Tensor, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.input_layernorm(hidden_states)
        attn_out, probs = self.self_attn(normed, **attn_kwargs)
        return hidden_states + self.dropout(attn_out) + self.dropout(self.mlp(normed)), probs


BLOCKS: dict[str, type[TinyBlock]] = {
    "pre_norm": TinyPreNormBlock,
    "post_norm": TinyPostNormBlock,
    "parallel": TinyParallelBlock,
}


# ---------------------------------------------------------------------------------------------------------------------
# LM head
# ---------------------------------------------------------------------------------------------------------------------
class TinySoftcapHead(nn.Linear):
    """An LM head whose logits are soft-capped, `cap * tanh(logits / cap)` (Gemma 2, Gemma Team 2024; modded-nanogpt):
    smooth, so small logits are unchanged and none exceeds `cap`. Capping inside the head keeps the weight name
    `lm_head.weight` and gives every caller of `lm_head` (generate, the inference engine) the same logits."""

    def __init__(self, in_features: int, out_features: int, cap: float):
        super().__init__(in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(super().forward(x) / self.cap)


def lm_head(config: TinyConfig) -> nn.Linear:
    """The head from hidden states to vocabulary logits: plain, or soft-capped when `config.logit_softcap` is set.
    With `zero_init_output` an untied head starts at zero; a tied one is the embedding table, which must not."""
    if config.logit_softcap is None:
        head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    else:
        head = TinySoftcapHead(config.hidden_size, config.vocab_size, config.logit_softcap)
    head.zero_init = config.zero_init_output and not config.tie_word_embeddings
    return head


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
class TinyPreTrainedModel(PreTrainedModel):
    """Connects the modules above to transformers: config class, weight init, SDPA and gradient checkpointing."""

    config_class = TinyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TinyPreNormBlock", "TinyPostNormBlock", "TinyParallelBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The one place weights are initialised: N(0, initializer_range) matrices and embeddings, zero biases, unit
        norms; with `zero_init_output`, zero output projections and untied head. Non-persistent buffers (RoPE
        frequencies, sinusoid table, ALiBi slopes) are recomputed here because `from_pretrained` builds the model on
        the meta device and they are not in the checkpoint. transformers' `init` functions skip tensors that were
        loaded from a checkpoint."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):  # marked by `mark_zero_init` (config.zero_init_output)
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding | TinyLearnedPositionEmbedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TinyLayerNorm | TinyRMSNorm):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TinyRotaryEmbedding):
            init.copy_(module.inv_freq, ROPE_SCALINGS[module.rope_type](module.config, None)[0])
        elif isinstance(module, TinySinusoidalPositionEmbedding):
            init.copy_(module.table, sinusoidal_table(*module.table.shape))
        elif isinstance(module, TinyModel) and module.alibi_slopes is not None:
            init.copy_(module.alibi_slopes, alibi_slopes(self.config.num_attention_heads))


def _pick_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    # transformers >= 5.24 passes the KV cache as `cache=`, older versions as `past_key_values=`: accept both.
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache=` or `past_key_values=`, not two different caches")
    return cache if cache is not None else past_key_values


class TinyModel(TinyPreTrainedModel):
    """The transformer without a head: embeddings, `num_hidden_layers` blocks, a final norm.

    Args:
        config: The model's `TinyConfig`.
    """

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding in ABSOLUTE_POSITIONS:
            self.embed_positions = ABSOLUTE_POSITIONS[config.position_embedding](config)
        self.rotary_emb = TinyRotaryEmbedding(config) if config.position_embedding == "rope" else None
        self.register_buffer(
            "alibi_slopes",
            alibi_slopes(config.num_attention_heads) if config.position_embedding == "alibi" else None,
            persistent=False,
        )
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(BLOCKS[config.block](config, i) for i in range(config.num_hidden_layers))
        # Post-norm blocks already end in a norm; the others need one before the head.
        self.norm = (
            nn.Identity() if config.block == "post_norm" else NORMS[config.norm](config.hidden_size, config.norm_eps)
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def add_positions(
        self, inputs_embeds: torch.Tensor, position_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The step between the token embeddings and the blocks: add absolute position embeddings (if any), apply
        embedding dropout, and compute the RoPE tables (if any) for `position_ids` (B, T). Shared with the inference
        engine (tiny_hf/engine.py), which drives the blocks with its own cache and mask.

        Returns:
            The hidden states (B, T, hidden) and the (cos, sin) tables for the blocks, or None without RoPE.
        """
        hidden_states = inputs_embeds
        if self.config.position_embedding in ABSOLUTE_POSITIONS:
            # The range check reads a value back from the device, which a CUDA-graph capture cannot do; the inference
            # engine, the only capturer, keeps every position inside its window, itself inside the table.
            capturing = position_ids.is_cuda and torch.cuda.is_current_stream_capturing()
            max_position = -1 if capturing else int(position_ids.max())
            if max_position >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {max_position} is beyond max_position_embeddings={self.config.max_position_embeddings} "
                    f"of the {self.config.position_embedding!r} position embedding; shorten the input"
                )
            hidden_states = hidden_states + self.embed_positions(position_ids)
        hidden_states = self.dropout(hidden_states)
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb else None
        return hidden_states, position_embeddings

    def _positions_and_bias(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Default position ids (left padding counted out) and the attention bias of a transformers-style call."""
        batch, q_len = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + q_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + seq_len) = "
                f"({batch}, {past_length + q_len}): it covers the cached tokens too"
            )
        if position_ids is None:
            if attention_mask is not None:
                # Count only real tokens, so a left-padded row gets the positions it would have unpadded.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_length, past_length + q_len, device=inputs_embeds.device)[None]
        bias = build_attention_bias(
            batch_size=batch,
            query_length=q_len,
            past_length=past_length,
            attention_mask=attention_mask,
            position_ids=position_ids,
            sliding_window=self.config.sliding_window,
            slopes=self.alibi_slopes,
            dtype=inputs_embeds.dtype,
            device=inputs_embeds.device,
        )
        return position_ids, bias

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        attention_bias: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Args as transformers' models, plus `attention_bias`: a ready bias over the keys the cache will return (see
        `attention_bias()`), as the inference engine builds it from its slots; it then replaces `attention_mask`, and
        `position_ids` are required."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must have shape (batch, past + seq_len) with 1 for tokens and 0 for padding, "
                f"got {tuple(attention_mask.shape)}"
            )
        cache = _pick_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputing a layer in the backward pass would write its keys to the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if attention_bias is None:
            position_ids, attention_bias = self._positions_and_bias(inputs_embeds, attention_mask, position_ids, cache)
        elif position_ids is None:
            raise ValueError("a given attention_bias needs the position_ids of the queries")
        hidden_states, position_embeddings = self.add_positions(inputs_embeds, position_ids)
        attn_kwargs = dict(
            attention_bias=attention_bias,
            position_embeddings=position_embeddings,
            cache=cache,
            output_attentions=bool(output_attentions),
        )
        all_hidden_states, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, probs = layer(hidden_states, **attn_kwargs)
            if output_attentions:
                all_attentions.append(probs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{CACHE_FIELD: cache},
        )


class TinyForCausalLM(TinyPreTrainedModel, GenerationMixin):
    """`TinyModel` with a language-modelling head: next-token logits and the shifted cross-entropy loss.

    Args:
        config: The model's `TinyConfig`; `tie_word_embeddings` shares `lm_head` with `embed_tokens`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.model = TinyModel(config)
        self.lm_head = lm_head(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Args as transformers' causal LMs; `labels` are the input ids (shifted inside the loss), -100 ignored.
        `logits_to_keep=n` computes logits for the last n positions only (generation needs just the last)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            # transformers' causal-LM loss: shift by one, ignore -100, and divide by `num_items_in_batch` when the
            # Trainer passes it, so gradient accumulation gives the same loss as one large batch.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


class TinyForSequenceClassification(TinyPreTrainedModel):
    """`TinyModel` with a `score` head read at the last real token of each row, as TRL's reward trainer expects.
    With `num_labels=1` it is a reward model; the loss follows `config.problem_type` like transformers' heads.

    Args:
        config: The model's `TinyConfig`, with `num_labels` and `pad_token_id` set.
    """

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = TinyModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch, seq_len = logits.shape[:2]
        # The last real token of each row, for left and right padding alike: the rightmost position that is not
        # padding. Taken from the attention mask when given, else from pad_token_id.
        if attention_mask is not None:
            real = attention_mask[:, -seq_len:].bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        elif batch == 1:
            real = torch.ones(batch, seq_len, dtype=torch.bool, device=logits.device)
        else:
            raise ValueError("a batch of more than one row needs an attention_mask or a pad_token_id in the config")
        last = (torch.arange(seq_len, device=logits.device) * real).argmax(-1)  # (B,)
        pooled_logits = logits[torch.arange(batch, device=logits.device), last]  # (B, num_labels)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)

        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


__all__ = ["TinyPreTrainedModel", "TinyModel", "TinyForCausalLM", "TinyForSequenceClassification"]
