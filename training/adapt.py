"""A short full fine-tune on token blocks: how pruning recovers (training/prune.py) and how Position Interpolation
adapts to its longer window (training/long_context.py). Pretraining itself is training/pretrain.py."""

from __future__ import annotations

import torch
from torch import nn

from tiny_hf import pruning


def train_on_blocks(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    steps: int = 20,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """`steps` AdamW steps of next-token loss on random rows of `blocks` (N, T), with pruning `masks` kept.

    Masked gradients are zeroed before clipping and the step (no Adam moments build up on dead weights, and they do
    not eat the clipping budget), and the masks are re-applied after each step, so the sparsity is exactly kept.
    Returns the loss of each step.
    """
    masks = masks or {}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    losses = []
    for _ in range(steps):
        ids = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)].to(device)  # (B, T)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        for name, mask in masks.items():
            model.get_submodule(name).weight.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pruning.apply_masks(model, masks)
        losses.append(loss.item())
    model.train(was_training)
    return losses
