"""Pruning: remove weights (sparsity) or whole heads and MLP neurons (a smaller dense model) from a trained model.

Unstructured methods zero individual weights of the transformer blocks' linear layers and return boolean masks, so
a recovery fine-tune (`finetune`) can keep them zero: `magnitude` (Han et al. 2015), `wanda` (Sun et al. 2023,
|W| times the input activation norm) and their 2:4 forms (NVIDIA's sparse tensor cores format). The embedding and
the (tied) LM head stay dense, as in Wanda and SparseGPT: they are shared and the most sensitive matrices.
Structured pruning (`prune_heads`, `prune_neurons`) slices the matrices and updates the config, so the result is a
normal, smaller tiny-hf model that `save_pretrained` / `AutoModelForCausalLM.from_pretrained` round-trip.

    masks = prune(model, "wanda", 0.5, calibration=blocks)   # blocks: (N, T) token ids
    finetune(model, train_blocks, masks=masks, steps=20)
    prune_heads(model, 1, calibration=blocks); prune_neurons(model, 64, calibration=blocks)
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .modeling_tiny import MLPS

# The linear layers pruned: those inside the transformer blocks (`model.layers.3.mlp.up_proj`), grouped by block.
_BLOCK_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------------------------
# Which weights, how sparse, and what the inputs look like
# ---------------------------------------------------------------------------------------------------------------------
def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of the transformer blocks (attention and MLP projections) by module name, in block order:
    what every method here prunes and what `sparsity` measures."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _BLOCK_LINEAR.search(name)
    }


def sparsity(model: nn.Module) -> float:
    """The fraction of zero weights in the blocks' linear layers (biases, embeddings and head not counted)."""
    layers = linear_layers(model).values()
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    return zeros / sum(layer.weight.numel() for layer in layers)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:  # also rejects NaN
        raise ValueError(f"sparsity={sparsity!r} is not in [0, 1): the fraction of weights to remove")


@torch.no_grad()
def input_norms(
    model: nn.Module, calibration: torch.Tensor, names: list[str], *, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """The L2 norm ||X_j||_2 of each input feature j of the named linear layers over every token of `calibration`
    (N, T): Wanda's activation statistic, collected with forward hooks. Returns name -> (in_features,) float32."""
    modules = dict(model.named_modules())
    sums = {name: torch.zeros(modules[name].in_features, dtype=torch.float64) for name in names}

    def hook(name: str) -> Callable:
        def accumulate(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (B * T, in)
            sums[name] += x.double().square().sum(0).cpu()

        return accumulate

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(calibration), batch_size):
            model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: total.sqrt().float() for name, total in sums.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Unstructured and 2:4 masks. Every mask function: (weight (out, in), sparsity, input norm (in,) or None) -> keep
# mask (out, in), True where the weight stays.
# ---------------------------------------------------------------------------------------------------------------------
def _drop_smallest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep mask of `score` (..., n) with the `count` smallest entries of each last-dimension row dropped (exactly
    `count`, ties broken by index)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if count > 0:
        keep.scatter_(-1, score.topk(count, dim=-1, largest=False).indices, False)
    return keep


def _two_four(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    # In each group of 4 consecutive input weights of a row keep the 2 highest scores: the layout the sparse tensor
    # cores of Ampere and later GPUs multiply at twice the dense rate (Mishra et al. 2021).
    if sparsity != 0.5:
        raise ValueError(f"sparsity={sparsity!r}, but a 2:4 pattern always removes exactly 0.5 of the weights")
    out_features, in_features = score.shape
    if in_features % 4:
        raise ValueError(f"in_features={in_features} is not a multiple of 4, so it has no 2:4 pattern")
    groups = score.reshape(out_features, in_features // 4, 4)  # (out, in / 4, 4)
    return _drop_smallest(groups, 2).reshape(out_features, in_features)


def magnitude_mask(weight: torch.Tensor, sparsity: float, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude pruning (Han et al. 2015): drop the smallest |W| of the whole matrix. Per matrix rather than one
    global threshold: layers differ in scale, and a global cut would empty some of them (Zhu & Gupta 2017)."""
    count = round(sparsity * weight.numel())
    return _drop_smallest(weight.abs().flatten(), count).reshape(weight.shape)


def wanda_mask(weight: torch.Tensor, sparsity: float, input_norm: torch.Tensor | None) -> torch.Tensor:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row, since a small weight on a
    feature with large activations (LLMs have outlier features) still moves the output a lot."""
    score = weight.abs() * input_norm[None, :]  # (out, in)
    return _drop_smallest(score, round(sparsity * weight.shape[1]))


def magnitude_2_4_mask(weight: torch.Tensor, sparsity: float, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """2:4 semi-structured magnitude pruning: in every 4 consecutive input weights keep the 2 largest |W|."""
    return _two_four(weight.abs(), sparsity)


def wanda_2_4_mask(weight: torch.Tensor, sparsity: float, input_norm: torch.Tensor | None) -> torch.Tensor:
    """2:4 semi-structured Wanda (Sun et al. 2023, Sec. 4): in every 4 consecutive inputs keep the 2 best |W|*||X||."""
    return _two_four(weight.abs() * input_norm[None, :], sparsity)


# method -> (needs calibration activations, mask function).
METHODS: dict[str, tuple[bool, Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]]] = {
    "magnitude": (False, magnitude_mask),
    "wanda": (True, wanda_mask),
    "2:4": (False, magnitude_2_4_mask),
    "wanda-2:4": (True, wanda_2_4_mask),
}


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str,
    sparsity: float = 0.5,
    *,
    calibration: torch.Tensor | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Zero weights of every block linear layer in place and return the keep masks (module name -> bool (out, in)).

    Blocks are pruned in order and Wanda's activations are collected block by block on the already pruned model
    (as in the paper's code), so later blocks see the inputs they will get.

    Args:
        model: A tiny-hf (or any HF causal) model.
        method: One of `METHODS`; the 2:4 methods remove exactly half, so they take only sparsity=0.5.
        sparsity: Fraction of each matrix's weights to remove, in [0, 1).
        calibration: (N, T) token ids whose activations Wanda scores with; needed by the "wanda" methods only.
        batch_size: Calibration blocks per forward pass.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {sorted(METHODS)}")
    _check_sparsity(sparsity)
    needs_activations, mask_fn = METHODS[method]
    if needs_activations and calibration is None:
        raise ValueError(f"method={method!r} scores weights by input activations: pass calibration=(N, T) token ids")
    by_block: dict[int, list[str]] = {}
    for name in linear_layers(model):
        by_block.setdefault(int(_BLOCK_LINEAR.search(name).group(1)), []).append(name)
    modules = dict(model.named_modules())
    masks = {}
    for names in by_block.values():
        norms = input_norms(model, calibration, names, batch_size=batch_size) if needs_activations else {}
        for name in names:
            weight = modules[name].weight
            masks[name] = mask_fn(weight, sparsity, norms[name].to(weight.device) if norms else None)
            weight.mul_(masks[name])
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked-out weights again (after an optimizer step), so sparsity survives training."""
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask)


# ---------------------------------------------------------------------------------------------------------------------
# Structured pruning: remove heads and neurons, shrink the matrices and the config
# ---------------------------------------------------------------------------------------------------------------------
def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear with only the output (dim=0) or input (dim=1) features in `index` (sorted) of `linear`."""
    weight = linear.weight.index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias if dim == 1 else linear.bias[index.to(linear.bias.device)])
    return new


def _blocks(model: nn.Module) -> nn.ModuleList:
    return getattr(model, model.base_model_prefix, model).layers


def removable_heads(config) -> list[int]:
    """The head counts `prune_heads` accepts for `config`: whole key/value groups (a multiple of the group size),
    fewer than all, and leaving a count that divides hidden_size (TinyConfig checks that even with head_dim set)."""
    group = config.num_attention_heads // config.num_key_value_heads
    return [
        n
        for n in range(0, config.num_attention_heads, group)
        if config.hidden_size % (config.num_attention_heads - n) == 0
    ]


@torch.no_grad()
def prune_heads(
    model: nn.Module, num_heads: int, calibration: torch.Tensor, *, batch_size: int = 8
) -> list[list[int]]:
    """Remove `num_heads` query heads from every attention layer (the same number everywhere: the config has one
    head count), in place, and update `num_attention_heads` / `num_key_value_heads`; head_dim is kept.

    With grouped-query attention a key/value head serves `group` consecutive query heads, so whole groups go (the
    key/value head with its query heads): removing query heads from some groups only would leave groups of unequal
    size, which `num_attention_heads / num_key_value_heads` cannot describe. A group's importance is the energy of
    its contribution to the attention output, estimated Wanda-style from o_proj's inputs on `calibration`:
    sum over its o_proj input columns j of ||X_j||^2 * ||W_o[:, j]||^2 (the cross terms within a head are ignored).

    Args:
        model: A tiny-hf model (with or without a head).
        num_heads: Query heads to remove per layer, one of `removable_heads(model.config)`.
        calibration: (N, T) token ids the importance is measured on.
        batch_size: Calibration blocks per forward pass.

    Returns:
        The kept query-head indices of each layer.
    """
    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    group = heads // kv_heads
    allowed = removable_heads(config)
    if num_heads not in allowed:
        raise ValueError(
            f"num_heads={num_heads!r} cannot be removed from num_attention_heads={heads} "
            f"(num_key_value_heads={kv_heads}, hidden_size={config.hidden_size}): whole groups of {group} query "
            f"heads go, at least one must remain and the rest must divide hidden_size; allowed: {allowed}"
        )
    if config.position_embedding == "alibi":
        raise ValueError(
            "position_embedding='alibi' derives each head's slope from num_attention_heads: removing "
            "heads would change the slopes of the heads that stay"
        )
    layers = _blocks(model)
    names = [name for name in linear_layers(model) if name.endswith("self_attn.o_proj")]  # one per block, in order
    norms = input_norms(model, calibration, names, batch_size=batch_size)
    kept_heads = []
    for layer, name in zip(layers, names, strict=True):
        attn = layer.self_attn
        energy = norms[name].to(attn.o_proj.weight.device).square() * attn.o_proj.weight.square().sum(0)  # (H * D,)
        group_score = energy.view(kv_heads, group * head_dim).sum(-1)  # (Hkv,): query heads of a group are adjacent
        kept_groups = group_score.topk(kv_heads - num_heads // group).indices.sort().values.cpu()  # (Hkv',)
        kv_dims = (kept_groups[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (Hkv' * D,)
        query_heads = (kept_groups[:, None] * group + torch.arange(group)).flatten()  # (H',)
        query_dims = (query_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (H' * D,)
        attn.q_proj = _slice_linear(attn.q_proj, query_dims, dim=0)
        attn.k_proj = _slice_linear(attn.k_proj, kv_dims, dim=0)
        attn.v_proj = _slice_linear(attn.v_proj, kv_dims, dim=0)
        attn.o_proj = _slice_linear(attn.o_proj, query_dims, dim=1)
        attn.num_heads, attn.num_kv_heads = len(query_heads), len(kept_groups)
        kept_heads.append(query_heads.tolist())
    # Blocks hold the model's config object, so this updates what they read too.
    config.num_attention_heads, config.num_key_value_heads = heads - num_heads, kv_heads - num_heads // group
    return kept_heads


@torch.no_grad()
def prune_neurons(
    model: nn.Module, num_neurons: int, calibration: torch.Tensor, *, batch_size: int = 8
) -> list[list[int]]:
    """Remove `num_neurons` hidden units from every MLP (the same number everywhere: the config has one
    intermediate_size), in place: rows of gate_proj/up_proj and columns of down_proj; `intermediate_size` follows.

    A neuron's importance is the energy of its contribution to the MLP output on `calibration`, which for one
    neuron is exactly ||h_i||^2 * ||W_down[:, i]||^2 (h: down_proj's input), Wanda's score summed over a column.

    Args:
        model: A tiny-hf model (with or without a head).
        num_neurons: Neurons to remove per MLP, in [0, intermediate_size).
        calibration: (N, T) token ids the importance is measured on.
        batch_size: Calibration blocks per forward pass.

    Returns:
        The kept neuron indices of each layer.
    """
    config = model.config
    if not 0 <= num_neurons < config.intermediate_size:
        raise ValueError(
            f"num_neurons={num_neurons!r} is not in [0, intermediate_size={config.intermediate_size}): "
            "at least one neuron per MLP must remain"
        )
    gated, _ = MLPS[config.mlp]
    layers = _blocks(model)
    names = [name for name in linear_layers(model) if name.endswith("mlp.down_proj")]  # one per block, in order
    norms = input_norms(model, calibration, names, batch_size=batch_size)
    kept_neurons = []
    for layer, name in zip(layers, names, strict=True):
        mlp = layer.mlp
        energy = norms[name].to(mlp.down_proj.weight.device).square() * mlp.down_proj.weight.square().sum(0)  # (I,)
        kept = energy.topk(config.intermediate_size - num_neurons).indices.sort().values.cpu()  # (I',)
        if gated:
            mlp.gate_proj = _slice_linear(mlp.gate_proj, kept, dim=0)
        mlp.up_proj = _slice_linear(mlp.up_proj, kept, dim=0)
        mlp.down_proj = _slice_linear(mlp.down_proj, kept, dim=1)
        kept_neurons.append(kept.tolist())
    config.intermediate_size -= num_neurons
    return kept_neurons


__all__ = [
    "METHODS",
    "apply_masks",
    "input_norms",
    "linear_layers",
    "magnitude_2_4_mask",
    "magnitude_mask",
    "prune",
    "prune_heads",
    "prune_neurons",
    "removable_heads",
    "sparsity",
    "wanda_2_4_mask",
    "wanda_mask",
]
