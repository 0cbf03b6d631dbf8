"""The order in which a run reads its examples: a fresh permutation per epoch, a pure function of the step.

Pretraining reads packed blocks and PPO prompts this way. Because the indices of step N depend only on (N, seed),
never on what ran before, a run resumed from a checkpoint reads exactly what the interrupted run would have.
"""

from __future__ import annotations

import torch


def global_batch_indices(step: int, global_batch: int, num_items: int, seed: int) -> list[int]:
    """The item indices of optimizer step `step`: `global_batch` items read in order from a permutation per epoch
    seeded by (seed, epoch); a batch that crosses an epoch boundary ends one permutation and starts the next."""
    indices, position = [], step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, num_items)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(global_batch - len(indices), num_items - offset)
        indices += order[offset : offset + take].tolist()
        position += take
    return indices
