"""Pretraining's optimizers: AdamW, or Muon on the hidden matrices with AdamW on everything else.

Muon (Keller Jordan, 2024; the optimizer of the modded-nanogpt speedrun records) takes the momentum of each weight
matrix's gradient and replaces it by the nearest semi-orthogonal matrix (a few Newton-Schulz iterations), so every
direction of the update has the same size. It is defined for 2-D matrices only: embeddings, the LM head, norms and
biases stay with AdamW, each optimizer at its own learning rate (`torch.optim.Muon`, torch >= 2.9).
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "muon")


class ChainedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one: its `param_groups` are theirs, read afresh on
    every access, so one LR scheduler, `accelerate.prepare` and a checkpoint see a single optimizer. (A list kept
    from construction would go stale: `load_state_dict`, which `accelerate.prepare` and resuming call, gives each
    optimizer new group dicts, and the scheduler would then set learning rates nobody reads.)

    Args:
        optimizers: the optimizers, each over its own parameters.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        self.optimizers = []  # Optimizer.__init__ checks its groups against ours: none yet
        super().__init__(params, {})
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value):  # Optimizer.__init__ assigns its own groups; the optimizers keep theirs
        pass

    @property
    def state(self):
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @state.setter
    def state(self, value):  # Optimizer.__init__ assigns an empty state; the optimizers keep their own
        pass

    @torch.no_grad()
    def step(self, closure=None):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(f"the saved optimizer state is not that of {len(self.optimizers)} chained optimizers")
        for opt, state in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(state)


def parameter_roles(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, str]]:
    """(name, parameter, role) of every trainable parameter, in the model's order. Roles: "matrix" (a hidden weight
    matrix: attention and MLP projections), "head" (an untied LM head), "embedding" (token and position tables; a
    tied head is the token table, listed once), "vector" (norms, biases: fewer than 2 dimensions), and "other" (a
    hidden parameter with more than 2 dimensions)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    roles = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids or "embed_tokens" in name or "embed_positions" in name:
            role = "embedding"
        elif id(param) in head_ids:
            role = "head"
        elif param.ndim < 2:
            role = "vector"
        else:
            role = "matrix" if param.ndim == 2 else "other"
        roles.append((name, param, role))
    return roles


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    embedding_lr: float | None = None,
    head_lr: float | None = None,
    sharded: bool = False,
) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (decaying norms, biases and embeddings pulls them toward zero
    for no benefit: GPT-2/nanoGPT practice), or Muon at `muon_lr` on the hidden matrices (decayed too) chained with
    that AdamW at `lr` on the rest. `embedding_lr` and `head_lr` give the embeddings and an untied head their own
    AdamW learning rate (modded-nanogpt's split: embeddings far higher, the head lower); None keeps `lr`.
    A hidden parameter Muon cannot take is an error naming it: one that is not 2-D,
    or any matrix when `sharded` (FSDP): Muon on a shard orthogonalizes the shard, not the matrix, and runs silently
    to different weights (checked with torch 2.13's fully_shard on 2 processes)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of {list(OPTIMIZERS)}")
    roles = parameter_roles(model)

    own_lr = {role: value for role, value in (("embedding", embedding_lr), ("head", head_lr)) if value is not None}

    def adamw(decayed: tuple[str, ...]) -> torch.optim.AdamW:
        groups = []
        for group_roles, decay in ((decayed, weight_decay), (("embedding", "vector"), 0.0)):
            shared = [p for _, p, role in roles if role in group_roles and role not in own_lr]
            groups.append({"params": shared, "weight_decay": decay})
            for role in (r for r in group_roles if r in own_lr):  # a role with its own rate: a group of its own
                params = [p for _, p, r in roles if r == role]
                groups.append({"params": params, "weight_decay": decay, "lr": own_lr[role]})
        groups = [group for group in groups if group["params"]]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available())

    if name == "adamw":
        return adamw(decayed=("matrix", "head", "other"))
    for param_name, param, role in roles:
        if role == "other":
            raise ValueError(
                f"--optimizer muon: parameter {param_name} has shape {tuple(param.shape)}, but torch.optim.Muon "
                "takes 2-D matrices only (embeddings, head, norms and biases go to AdamW); use --optimizer adamw"
            )
    matrices = [p for _, p, role in roles if role == "matrix"]
    if sharded:
        raise ValueError(
            f"--optimizer muon: the hidden matrices ({len(matrices)}) would be FSDP shards, and Muon needs each "
            "whole matrix; train with --optimizer adamw under FSDP, or with data parallel (DDP)"
        )
    muon = torch.optim.Muon(matrices, lr=muon_lr, weight_decay=weight_decay, momentum=muon_momentum)
    return ChainedOptimizer([muon, adamw(decayed=("head",))])
