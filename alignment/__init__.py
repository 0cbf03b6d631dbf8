"""Fine-tuning and alignment stages: instruction data, SFT, reward model, DPO, PPO (each an entry script)."""

from __future__ import annotations


def model_path(flag: str, name: str) -> str:
    """Where a stage's `--model` / `--reward-model` loads from (app.resolve_model: a run folder's model/, a model
    folder or a Hub id); a local folder without a model in it is a ValueError that names the flag."""
    from app import resolve_model

    try:
        return resolve_model(name)[0]
    except FileNotFoundError as error:
        raise ValueError(f"{flag} {name}: {error}") from None


def trl_defaults() -> dict:
    """The TRL config fields every stage here sets alike: no trainer checkpoints or reporting (each script writes its
    own outputs), fp32 without activation checkpointing (TRL defaults to bf16 and checkpointing, which are slow or
    unsupported on a CPU), the CPU when there is no GPU, and no dataloader workers."""
    import torch

    return {"save_strategy": "no", "report_to": "none", "use_cpu": not torch.cuda.is_available(), "bf16": False,
            "activation_checkpointing": False, "dataloader_num_workers": 0}  # fmt: skip
