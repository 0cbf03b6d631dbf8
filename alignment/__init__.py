"""Fine-tuning and alignment stages: instruction data, SFT, reward model, DPO, PPO (each an entry script)."""

from __future__ import annotations


def trl_defaults() -> dict:
    """The TRL config fields every stage here sets alike: no trainer checkpoints or reporting (each script writes its
    own outputs), fp32 without activation checkpointing (TRL defaults to bf16 and checkpointing, which are slow or
    unsupported on a CPU), the CPU when there is no GPU, and no dataloader workers."""
    import torch

    return {
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "activation_checkpointing": False,
        "dataloader_num_workers": 0,
    }
