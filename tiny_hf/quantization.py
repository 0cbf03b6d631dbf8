"""Weight-only quantization from scratch: absmax and zero-point int8, group-wise int4 packed two values per byte.

A quantized weight is integers plus the float scales (and zero points) that map them back; `QuantizedLinear`
stores those as buffers and dequantizes to the activation dtype at every call, so memory (and the bandwidth that
bounds decoding) shrinks while the matmul itself stays in float. Each scheme is a validated string in `SCHEMES`.

    from tiny_hf.quantization import quantize_model, model_weight_bytes
    quantize_model(model, scheme="int4", group_size=64)  # nn.Linear -> QuantizedLinear, in place
    print(model_weight_bytes(model))

Imports only torch: the learner reads the whole method here, and bitsandbytes stays the peer to compare against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantScheme:
    """How a weight matrix becomes integers: `bits` per value, `symmetric` (absmax, no offset) or with a zero point,
    and which values share one scale: the whole "tensor", one output row ("channel") or `group_size` consecutive
    inputs of a row ("group")."""

    bits: int
    symmetric: bool
    granularity: str


# Per-tensor int8 is the textbook baseline; one scale per output row (channel) is what LLM.int8 (Dettmers et al.
# 2022) does for weights; int4 needs small groups (GPTQ, Frantar et al. 2022; AWQ, Lin et al. 2023) because 16
# levels per scale cannot cover a whole row's range without rounding most weights to zero.
SCHEMES: dict[str, QuantScheme] = {
    "int8": QuantScheme(bits=8, symmetric=True, granularity="tensor"),
    "int8-channel": QuantScheme(bits=8, symmetric=True, granularity="channel"),
    "int8-zeropoint": QuantScheme(bits=8, symmetric=False, granularity="channel"),
    "int4": QuantScheme(bits=4, symmetric=True, granularity="group"),
    "int4-zeropoint": QuantScheme(bits=4, symmetric=False, granularity="group"),
}


def get_scheme(scheme: str) -> QuantScheme:
    """The `QuantScheme` named `scheme`; a ValueError names the allowed ones."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not one of {list(SCHEMES)}")
    return SCHEMES[scheme]


# ---------------------------------------------------------------------------------------------------------------------
# The two primitives: absmax (symmetric) and zero-point (asymmetric) quantization over any reduction dims.
# ---------------------------------------------------------------------------------------------------------------------
def _reduce_dims(x: torch.Tensor, dim: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.ndim))
    return (dim,) if isinstance(dim, int) else tuple(dim)


def absmax_quantize(
    x: torch.Tensor, bits: int = 8, dim: int | tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: scale = max|x| / (2^(bits-1) - 1), q = round(x / scale), one scale per slice reduced
    over `dim` (None: the whole tensor). Zero maps to zero exactly, but one outlier stretches the scale of every value
    it shares it with: the problem LLM.int8 (Dettmers et al. 2022) attacks. Returns int8 q and float32 scales."""
    qmax = 2 ** (bits - 1) - 1
    absmax = x.float().abs().amax(dim=_reduce_dims(x, dim), keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))  # an all-zero slice keeps scale 1
    q = torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def zeropoint_quantize(
    x: torch.Tensor, bits: int = 8, dim: int | tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization: map [min, max] (widened to contain 0) onto 0..2^bits - 1, x ~ (q - zero) * scale.
    Uses all 2^bits levels when the values are skewed (one more level than absmax, and none wasted on the empty
    side), at the cost of storing a zero point per scale. Returns uint8 q, float32 scales and uint8 zero points."""
    qmax = 2**bits - 1
    dims = _reduce_dims(x, dim)
    low = x.float().amin(dim=dims, keepdim=True).clamp(max=0)
    high = x.float().amax(dim=dims, keepdim=True).clamp(min=0)
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Rounding the zero point shifts the grid by at most scale/2, so the extremes are still within scale/2 of it.
    zero = torch.clamp(torch.round(-low / scale), 0, qmax)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, qmax).to(torch.uint8)
    return q, scale, zero.to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Back to float32: q * scale, or (q - zero) * scale with a zero point. The error per value is at most scale/2."""
    q = q.float() if zero is None else q.float() - zero.float()
    return q * scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values (0..15, uint8) per byte along the last dim: even index in the low nibble, odd in the high one.
    Halves the storage that uint8 would take: the memory win of int4 exists only once packed."""
    if q.dtype != torch.uint8:
        raise TypeError(f"pack_int4 takes uint8 values 0..15, got dtype={q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4 takes values 0..15, got a maximum of {int(q.max())}")
    return q[..., 0::2] | (q[..., 1::2] << 4)  # (..., n/2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: (..., n/2) bytes -> (..., n) uint8 values 0..15."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # (..., n/2, 2) -> (..., n)


# ---------------------------------------------------------------------------------------------------------------------
# A whole weight matrix under a named scheme
# ---------------------------------------------------------------------------------------------------------------------
def _check_weight(weight: torch.Tensor, scheme: QuantScheme, group_size: int) -> None:
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cannot quantize a weight of dtype={weight.dtype}: expected one of {list(FLOAT_DTYPES)}")
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if scheme.granularity == "group" and (group_size <= 0 or in_features % group_size):
        raise ValueError(
            f"group_size={group_size} must be a positive divisor of in_features={in_features} "
            f"(divisors: {[d for d in range(1, in_features + 1) if in_features % d == 0]})"
        )
    if scheme.bits == 4 and in_features % 2:
        raise ValueError(f"int4 packs two values per byte: in_features={in_features} must be even")


def _groups(weight: torch.Tensor, scheme: QuantScheme, group_size: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The weight viewed as (rows, n_groups, values per group) and the dims one scale is shared over."""
    out_features, in_features = weight.shape
    if scheme.granularity == "tensor":
        return weight.view(out_features, 1, in_features), (0, 1, 2)  # one scale for everything
    if scheme.granularity == "channel":
        return weight.view(out_features, 1, in_features), (2,)  # one scale per output row
    return weight.view(out_features, in_features // group_size, group_size), (2,)  # (out, in/g, g)


def quantize_weight(weight: torch.Tensor, scheme: str, group_size: int = 64) -> dict[str, torch.Tensor | None]:
    """Quantize an (out, in) weight: `qweight` (int8, or uint8 with a zero point; int4 packed (out, in/2) uint8),
    float32 `scale` of shape (1 or out, n_groups) and `zero` (same shape, uint8) or None. `group_size` is read only
    by the group-wise schemes."""
    spec = get_scheme(scheme)
    _check_weight(weight, spec, group_size)
    grouped, dims = _groups(weight.detach(), spec, group_size)
    if spec.symmetric:
        q, scale = absmax_quantize(grouped, spec.bits, dims)
        zero = None
    else:
        q, scale, zero = zeropoint_quantize(grouped, spec.bits, dims)
    q = q.reshape(weight.shape)  # (out, n_groups, g) -> (out, in)
    if spec.bits == 4:
        # Symmetric int4 is -7..7: offset by 8 into 0..15 so both kinds pack as unsigned nibbles.
        q = pack_int4((q + 8).to(torch.uint8) if spec.symmetric else q)  # (out, in/2)
    return {"qweight": q, "scale": scale.squeeze(-1), "zero": None if zero is None else zero.squeeze(-1)}


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: str
) -> torch.Tensor:
    """Float32 (rows, in) from what `quantize_weight` stored (or any subset of its rows, with matching scales)."""
    spec = get_scheme(scheme)
    q = qweight
    if spec.bits == 4:
        q = unpack_int4(q)  # (rows, in)
        q = q.to(torch.int8) - 8 if spec.symmetric else q
    rows, in_features = q.shape
    grouped = q.view(rows, scale.shape[-1], -1)  # (rows, n_groups, g); per-tensor: (rows, 1, in)
    scale = scale.unsqueeze(-1)  # (1 or rows, n_groups, 1)
    zero = None if zero is None else zero.unsqueeze(-1)
    return dequantize(grouped, scale, zero).view(rows, in_features)


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A linear layer storing its weight as integers + scales (+ zero points) in buffers and dequantizing it to the
    activation dtype at each call: weight-only quantization, the form GPTQ and AWQ deploy, in plain PyTorch.

    Args:
        in_features: Input width.
        out_features: Output width.
        scheme: A key of `SCHEMES`.
        group_size: Inputs per scale for the group-wise schemes (must divide `in_features`).
        bias: Whether the layer has a (float) bias.
        dtype: The dtype the weight had, which `QuantizedEmbedding` returns.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        scheme: str = "int8-channel",
        group_size: int = 64,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        spec = get_scheme(scheme)
        _check_weight(torch.empty(0, in_features, dtype=dtype), spec, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size, self.dtype = scheme, group_size, dtype
        q_dtype = torch.int8 if spec.symmetric and spec.bits == 8 else torch.uint8
        q_width = in_features // 2 if spec.bits == 4 else in_features
        scale_rows = 1 if spec.granularity == "tensor" else out_features
        n_groups = in_features // group_size if spec.granularity == "group" else 1
        self.register_buffer("qweight", torch.zeros(out_features, q_width, dtype=q_dtype))
        self.register_buffer("scale", torch.ones(scale_rows, n_groups))
        zero = None if spec.symmetric else torch.zeros(scale_rows, n_groups, dtype=torch.uint8)
        self.register_buffer("zero", zero)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "int8-channel", group_size: int = 64) -> QuantizedLinear:
        """Quantize `linear`'s weight under `scheme`; the bias stays float (it is tiny and added, not multiplied)."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            scheme=scheme,
            group_size=group_size,
            bias=linear.bias is not None,
            dtype=weight.dtype,
        )
        stored = quantize_weight(weight, scheme, group_size)
        layer.qweight, layer.scale, layer.zero = stored["qweight"], stored["scale"], stored["zero"]
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer.to(weight.device)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight this layer stands for, in `dtype` (default: the original weight's)."""
        weight = dequantize_weight(self.qweight, self.scale, self.zero, self.scheme)
        return weight.to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def weight_memory_bytes(self) -> int:
        """Bytes of everything stored for this layer: integers, scales, zero points and bias."""
        return sum(t.nbytes for t in (self.qweight, self.scale, self.zero, self.bias) if t is not None)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if get_scheme(self.scheme).granularity == "group" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme!r}{group}"


class QuantizedEmbedding(nn.Module):
    """An embedding table held as a `QuantizedLinear`'s buffers (one row per token), dequantizing only the rows
    looked up. Built from a tied lm_head it shares that layer's buffers, so the tied matrix is stored once.

    Args:
        source: The quantized (vocab, hidden) matrix, usually the tied lm_head.
    """

    def __init__(self, source: QuantizedLinear):
        super().__init__()
        self.scheme, self.dtype = source.scheme, source.dtype
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
        self.register_buffer("qweight", source.qweight)
        self.register_buffer("scale", source.scale)
        self.register_buffer("zero", source.zero)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = input_ids.reshape(-1)  # (N,)
        # Per-tensor schemes keep one scale row that every token shares; the others have one scale row per token.
        scale = self.scale if self.scale.shape[0] == 1 else self.scale[rows]
        zero = None if self.zero is None else (self.zero if self.zero.shape[0] == 1 else self.zero[rows])
        vectors = dequantize_weight(self.qweight[rows], scale, zero, self.scheme)  # (N, hidden)
        return vectors.to(self.dtype).view(*input_ids.shape, self.embedding_dim)  # (..., hidden)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme!r}"


# ---------------------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------------------
def _skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether `skip` names the module fully ("model.layers.0.mlp.up_proj") or by its last part ("up_proj")."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(
    model: nn.Module, scheme: str = "int8-channel", group_size: int = 64, skip: Iterable[str] = ("lm_head",)
) -> nn.Module:
    """Replace every nn.Linear of `model` not named in `skip` by a `QuantizedLinear`, in place, and return `model`.

    The lm_head is skipped by default, like LLM.int8 and bitsandbytes do: it is usually tied to the input embedding,
    so quantizing it alone would store the matrix twice (float for lookups, integers for logits), and it is the most
    sensitive layer (its errors land straight on the logits). Embeddings are lookups, not matmuls: nothing to speed
    up. Drop "lm_head" from `skip` on a tied model and the shared matrix is quantized once, for both uses (worth it
    when, as in a tiny model with a large vocabulary, the embedding is a big share of all weights).
    """
    get_scheme(scheme)
    skip = tuple(skip)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = isinstance(head, nn.Linear) and isinstance(embeddings, nn.Embedding) and head.weight is embeddings.weight
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or _skipped(name, skip):
                continue
            quantized = QuantizedLinear.from_linear(child, scheme, group_size)
            setattr(parent, child_name, quantized)
            if tied and child is head:
                model.set_input_embeddings(QuantizedEmbedding(quantized))
    return model


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights: every parameter (a tied one once) plus the buffers of quantized modules (integers,
    scales, zero points; shared ones once). Position tables and other non-weight buffers are not counted."""
    tensors = list(model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear | QuantizedEmbedding):
            tensors += [b for b in module.buffers(recurse=False)]
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total


def bnb_cpu_blocks(
    model: torch.nn.Module, float_model: torch.nn.Module | None, *, portable: bool = False
) -> torch.nn.Module:
    """Make bitsandbytes' 4-bit layers compute what they should on CPU, in place; returns `model`.

    bitsandbytes 0.50's CPU 4-bit kernels (the dequantization and the AVX512-BF16 packed matmul) find a value's block
    per row, so they are right only when a layer's input width is a multiple of the block size (64): tiny-3m's 160
    is not, and its NF4 weights came back with 25% relative error instead of 9% (perplexity doubled), or the packed
    path failed (`shape '[160, 2]' is invalid`). Each such layer is quantized again from `float_model`'s weight in
    the largest valid block size that divides its width (32 for 160), which the kernels handle. No-op on GPU.

    `portable=True` also keeps every 4-bit layer off the packed path, which rounds the block scales to bf16 at the
    first no-grad forward: a QLoRA model evaluated before training and its reloaded adapter would otherwise compute
    with different scales.
    """
    import bitsandbytes as bnb

    floats = dict(float_model.named_modules()) if float_model is not None else {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or weight.device.type != "cpu":
            continue
        if module.in_features % state.blocksize:
            sizes = [b for b in (64, 32) if module.in_features % b == 0]
            if not sizes or name not in floats:
                raise ValueError(
                    f"{name}: bitsandbytes' CPU 4-bit kernels need an input width that is a multiple of 32 or 64, "
                    f"and in_features={module.in_features} is not (or no float model was given to re-quantize from)"
                )
            source = floats[name].weight.detach().float().contiguous()
            data, new_state = bnb.functional.quantize_4bit(
                source, blocksize=sizes[0], quant_type=state.quant_type, compress_statistics=state.nested
            )
            new_state.dtype = state.dtype
            module.weight = bnb.nn.Params4bit(
                data,
                requires_grad=False,
                quant_state=new_state,
                blocksize=sizes[0],
                compress_statistics=state.nested,
                quant_type=state.quant_type,
                module=module,
                bnb_quantized=True,
            )
        if portable:
            module.support_avx512bf16_for_cpu = False
    return model
