"""Fine-tuning and alignment stages: instruction data, SFT, reward model, DPO, PPO, GRPO/RLOO and their comparison.

The TRL-wrapping stages (sft, reward, dpo, grpo) take TRL's own config dataclass plus a small one of theirs; what
they share lives here: the defaults they all set alike, where the trainer's files go, the LoRA config, the checks
of positive counts and writing the summary. They log through the Trainer's own integrations, `--report-to
tensorboard|trackio|wandb|none` (training/trackers.py): TensorBoard in `<out>/tb` by default.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.trackers import PROJECT, place_trainer_reports

# TrainingArguments' output_dir when none is given: the stages replace it with <out>/trainer.
_TRAINER_FALLBACK = "trainer_output"


def trl_defaults() -> dict:
    """The TRL config fields every stage here sets alike: no trainer checkpoints (each script writes its own outputs),
    TensorBoard reporting (trackio / wandb runs in the project "tiny-hf"), fp32 without activation checkpointing (TRL
    defaults to bf16 and checkpointing, which are slow or unsupported on a CPU), the CPU when there is no GPU, no
    dataloader workers, and seed 0."""
    import torch

    return {
        "save_strategy": "no",
        "report_to": "tensorboard",
        "project": PROJECT,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "activation_checkpointing": False,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def place_trainer_output(config, out: Path) -> None:
    """Point the trainer's own files at `<out>/trainer` unless `--output-dir` was given (TrainingArguments turns a
    missing one into "trainer_output" in the working directory); check `--report-to` and name the trackio / wandb
    run after `out`. TensorBoard's folder is set when the trainer is built (`trackers.trainer_tensorboard_dir`)."""
    if config.output_dir == _TRAINER_FALLBACK:
        config.output_dir = str(out / "trainer")
    place_trainer_reports(config, out)


def check_at_least_one(**values: int) -> None:
    """Raise a ValueError naming the first flag (`max_steps` -> `--max-steps`) whose value is below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be at least 1")


def lora_config(rank: int, task_type: str, **kwargs):
    """PEFT's LoRA on every linear layer with alpha = 2 x rank and no dropout (the stages' one LoRA recipe)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type=task_type, target_modules="all-linear", **kwargs
    )


def write_summary(name: str, figures: dict, table: str, out: Path, results: Path | None) -> None:
    """`<out>/summary.json` and `summary.md`, and `<results>/<name>.md`/`.json` when `--results` is given."""
    from tiny_hf.results import write_results

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "summary.md").write_text(table)
    if results is not None:
        write_results(name, figures, table, results)
    print(table)
