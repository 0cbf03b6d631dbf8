"""LoRA from scratch (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), torch only.

A frozen linear layer W gets a trainable low-rank update: y = W x + (alpha / r) * B A dropout(x), with A (r, in)
initialised like PEFT (Kaiming-uniform, a=sqrt(5)) and B (out, r) zero, so training starts from the base model
exactly. `merge()` folds B A into W, after which the layer costs nothing extra at inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) * lora_B(lora_A(dropout(x)))` over a frozen `nn.Linear` (PEFT's layout and scaling).

    Args:
        base: The pretrained layer; its weight and bias are frozen.
        r: Rank of the update (the inner width of A and B).
        alpha: Scale numerator: the update is multiplied by alpha / r, so changing r keeps its size comparable.
        dropout: Dropout on the input of the low-rank path only.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r={r!r} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is not in [0, 1)")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)  # (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)  # (out, r)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default (PEFT's `init_lora_weights=True`), B zero: the update starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the update into the base weight (W += alpha/r * B A) and return the base layer, which now computes
        what this layer did (without dropout)."""
        if not self.merged:
            self.base.weight += (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
            self.merged = True
        return self.base


def find_linear(model: nn.Module, target_modules: list[str], types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Names of the `types` leaves in `model` whose name is, or ends with '.' + , one of `target_modules` (PEFT's
    suffix rule). Raises ValueError naming the targets that match nothing and the layer names that exist."""
    linear = [name for name, module in model.named_modules() if isinstance(module, types)]
    matches = [name for name in linear if any(name == t or name.endswith("." + t) for t in target_modules)]
    missing = [t for t in target_modules if not any(name == t or name.endswith("." + t) for name in linear)]
    if missing or not target_modules:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(
            f"target_modules {missing or target_modules} match no linear layer of {type(model).__name__}; "
            f"its linear layer names are {available}"
        )
    return matches


def apply_lora(
    model: nn.Module, target_modules: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0
) -> nn.Module:
    """Wrap every nn.Linear matched by `target_modules` (name suffixes, see `find_linear`) in a `LoRALinear` and
    freeze all other parameters, in place; returns `model`."""
    names = find_linear(model, target_modules)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` in `model` by its merged base layer, in place (PEFT's `merge_and_unload`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merge())
    return model
