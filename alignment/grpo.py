"""Reinforcement learning with verifiable rewards: GRPO or RLOO (TRL's `GRPOTrainer` / `RLOOTrainer`) on "Which
module of the standard library defines `name`?", whose answer code can check.

    tiny-hf grpo --model runs/sft --out runs/grpo                         # GRPO, exact-match reward
    tiny-hf grpo --model runs/sft --algo rloo --out runs/rloo --lora      # RLOO with LoRA adapters
    tiny-hf grpo --model runs/sft --rewards exact_match,format --reward-model runs/reward

Options: every field of TRL's `GRPOConfig` (with `--algo rloo`: `RLOOConfig`): `--num-generations`,
`--max-completion-length`, `--temperature`, `--beta`, `--max-steps`, `--per-device-train-batch-size`,
`--learning-rate`, ...; `--config file.yaml` too; and this stage's own (`GRPOOptions`). The project's defaults where
they differ from TRL's are `DEFAULTS`. Logs: `--report-to` (training/trackers.py), TensorBoard in `<out>/tb` by
default, or trackio, wandb, none.

Both sample `--num-generations` answers per prompt and score each; neither has a value model. The advantage of an
answer is its reward against the others of its group: GRPO (Shao et al. 2024, DeepSeekMath) subtracts the group's
mean and divides by its std; RLOO (Ahmadian et al. 2024, "Back to Basics") subtracts the mean of the *other*
answers (leave-one-out). Either way a group whose rewards all tie (all right, or, far more often on a small model,
all wrong) has zero advantage everywhere and teaches nothing: the summary reports that share of groups (TRL logs
it as `frac_reward_zero_std`). `--beta` > 0 adds a KL penalty towards the starting model (with LoRA: the adapters
switched off; else TRL loads a second copy from the folder).

Rewards: python functions by name (REWARD_FUNCS: `exact_match`, the name or number given first is the answer;
`partial_credit` and `digits`, shaped versions that rank near misses; `format`, the answer is one backticked name)
and/or a reward model folder (alignment/reward.py's `<out>/model`), summed.

Reports held-out exact match with greedy decoding before and after, and the logged rewards, in
`<out>/summary.md`; `--results bench/results` also writes `<algo>.md`/`.json`. The policy (with LoRA: merged) is
exported to `<out>/model`.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import tiny_hf
from alignment import check_at_least_one, lora_config, place_trainer_output, trl_defaults, write_summary
from alignment.data import (
    arithmetic_dataset,
    digit_reward,
    exact_match_reward,
    partial_credit_reward,
    preference_dataset,
    train_and_held_out,
    verifiable_dataset,
)
from tiny_hf.chat import chat_generate, end_of_turn_ids
from tiny_hf.options import parse_options
from tiny_hf.results import markdown_cell
from tiny_hf.runs import model_path
from training.model_card import record_stage
from training.trackers import trainer_tensorboard_dir

ALGOS = ("grpo", "rloo")
# What the trainers log per step that the summary keeps (TRL's names; `kl` only when beta > 0).
LOGGED = ("reward", "reward_std", "frac_reward_zero_std", "kl", "completions/mean_length")
# GRPOConfig / RLOOConfig fields whose project default differs from TRL's (with alignment.trl_defaults); the same
# for both algorithms, so that they compare like with like (RLOO's own beta default is 0.05).
DEFAULTS = {
    "max_steps": 200,
    "per_device_train_batch_size": 32,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant_with_warmup",
    "logging_steps": 5,
    "num_generations": 8,
    "max_completion_length": 24,
    "beta": 0.0,
}


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 where the answer is a single backticked dotted name ("`json.decoder`"), the form SFT taught, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.fullmatch(r"`[A-Za-z_][\w.]*`", t.strip()) else 0.0 for t in texts]


# Python rewards by name, all with TRL's reward-function signature (completions, **dataset columns) -> floats.
REWARD_FUNCS = {
    "exact_match": exact_match_reward,
    "partial_credit": partial_credit_reward,
    "digits": digit_reward,
    "format": format_reward,
}


@dataclass
class GRPOOptions:
    """This stage's own options; the trainer's are TRL's `GRPOConfig` or `RLOOConfig` (by `--algo`)."""

    model: str = field(default="runs/sft", metadata={"help": "the SFT run (a run folder, model folder or Hub id)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (r=--rank)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2 x rank)"})
    algo: str = field(default="grpo", metadata={"help": f"one of {list(ALGOS)}"})
    rewards: str = field(
        default="exact_match", metadata={"help": f"comma-separated, from {list(REWARD_FUNCS)}; '' = none"}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "a reward model folder (alignment/reward.py's <out>/model)"}
    )
    data: str = field(
        default="embedded",
        metadata={
            "help": "embedded (the verifiable questions), arithmetic[:add,sub,cmp] (alignment.data."
            "arithmetic_dataset), docs (the preference task's prompts, for --reward-model), or .json/.jsonl with "
            "'prompt' and 'answer'"
        },
    )
    max_examples: int | None = field(default=None, metadata={"help": "train on a fixed subset (quick runs)"})
    eval_examples: int = field(default=200, metadata={"help": "held-out questions for the exact match"})
    out: Path = field(default=Path("runs/grpo"), metadata={"help": "model/, summary.md and the trainer's files"})
    results: Path | None = field(default=None, metadata={"help": "also write <algo>.md/.json here (bench/results)"})

    @property
    def reward_names(self) -> list[str]:
        return [name.strip() for name in self.rewards.split(",") if name.strip()]


def config_class(argv: list[str]):
    """GRPOConfig or RLOOConfig, by `--algo` on the command line, else in the `--config` file: the two trainers'
    options differ (GRPO's `scale_rewards`, RLOO's `normalize_advantages`), so the parser needs the class first."""
    from trl import GRPOConfig, RLOOConfig

    algo = _flag_value(argv, "--algo")
    if algo is None and (config_file := _flag_value(argv, "--config")) and Path(config_file).is_file():
        import yaml

        algo = (yaml.safe_load(Path(config_file).read_text()) or {}).get("algo")
    algo = algo or "grpo"
    if algo not in ALGOS:
        raise ValueError(f"--algo={algo!r} is not one of {list(ALGOS)}")
    return GRPOConfig if algo == "grpo" else RLOOConfig


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` or `flag=VALUE` in argv, or None."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def parse_args(argv: list[str] | None = None):
    """(GRPOOptions, GRPOConfig or RLOOConfig) from the command line (and `--config`), with the project's defaults,
    checked. TRL's config checks its own fields (at least 2 generations, whole groups per batch)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options, config = parse_options(
        GRPOOptions, config_class(argv), argv=argv, description=__doc__, defaults={**trl_defaults(), **DEFAULTS}
    )
    place_trainer_output(config, options.out)
    check_args(options, config)
    return options, config


def check_args(options: GRPOOptions, config) -> None:
    for name in options.reward_names:
        if name not in REWARD_FUNCS:
            raise ValueError(f"--rewards: {name!r} is not one of {list(REWARD_FUNCS)}")
    if not options.reward_names and options.reward_model is None:
        raise ValueError("no reward: give --rewards and/or --reward-model")
    if not config.beta >= 0:
        raise ValueError(f"--beta={config.beta} must be >= 0 (a negative KL coefficient rewards drifting away)")
    if not config.temperature > 0 or not config.learning_rate > 0:
        raise ValueError(f"--temperature={config.temperature} and --learning-rate={config.learning_rate} must be > 0")
    check_at_least_one(
        max_steps=config.max_steps,
        max_completion_length=config.max_completion_length,
        rank=options.rank,
        eval_examples=options.eval_examples,
    )


def load_verifiable(spec: str, max_examples: int | None) -> datasets.DatasetDict:
    """The verifiable questions (`embedded`), the arithmetic questions (`arithmetic[:kinds]`), the docs prompts
    (`docs`, answer = the true summary) or a local file of `prompt` + `answer` rows (the column `exact_match`
    checks); returned with `prompt` and `answer` only."""
    if spec == "embedded":
        data = verifiable_dataset(max_examples=max_examples)
    elif spec.partition(":")[0] == "arithmetic":
        data = arithmetic_dataset(spec, train_size=max_examples)
    elif spec == "docs":  # the preference task's prompts; `answer` = the true summary (for a reward model to judge)
        pairs = preference_dataset(max_examples=max_examples)
        data = pairs.map(lambda row: {"answer": row["chosen"][-1]["content"]})
    else:
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"--data {spec}: no such file or folder")
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.json*"))
        loaded = datasets.load_dataset("json", data_files=files)["train"]
        if missing := {"prompt", "answer"} - set(loaded.column_names):
            raise ValueError(f"--data {spec}: rows need 'prompt' and 'answer'; {sorted(missing)} missing")
        data = train_and_held_out({"train": loaded}, 0.1, max_examples)
    return datasets.DatasetDict({split: ds.select_columns(["prompt", "answer"]) for split, ds in data.items()})


def greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts, ending at the end of the turn (`tiny_hf.chat`: the engine where it runs the
    model, else `generate()`)."""
    return [reply.text for reply in chat_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    """Held-out exact match of greedy answers (the `exact_match` reward, averaged) and a few samples."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    scores = exact_match_reward(answers, [r["answer"] for r in rows])
    return {"exact_match": sum(scores) / max(len(scores), 1), "answers": answers}


# ---------------------------------------------------------------------------------------------------------------------
# The stage: setup, evaluate, train, finish
# ---------------------------------------------------------------------------------------------------------------------
def load_policy(options: GRPOOptions, config):
    """The policy and its tokenizer; sets the trainer's generation to stop at the end of the turn."""
    path = model_path("--model", options.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"--model {options.model}: the tokenizer has no chat template to format the questions with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    # Loaded from the folder: with --beta > 0 and no LoRA, TRL loads the reference from config._name_or_path.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=config.trust_remote_code)
    config.generation_kwargs = {"eos_token_id": end_of_turn_ids(tokenizer), **(config.generation_kwargs or {})}
    if config.beta > 0 and not options.lora:
        # TRL then loads the reference with create_model_from_path(config._name_or_path), which reads
        # `config.auto_map` to pick an Auto class for architectures outside transformers: a folder saved without one
        # (plain save_pretrained of a TinyForCausalLM) fails there with AttributeError (TRL 1.16, transformers 5.24).
        # Naming the Auto class skips that guess; TRL warns that model_init_kwargs are ignored for the policy.
        config.model_init_kwargs = {"architecture": AutoModelForCausalLM, **(config.model_init_kwargs or {})}
    return model, tokenizer, dtype


def reward_functions(options: GRPOOptions, config, dtype) -> tuple[list, list]:
    """The reward functions (python ones by name, then the reward model) and their processing classes."""
    funcs, classes = [REWARD_FUNCS[name] for name in options.reward_names], [None] * len(options.reward_names)
    if options.reward_model is not None:
        path = model_path("--reward-model", options.reward_model)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        if tokenizer.pad_token is None:
            raise ValueError(
                f"--reward-model {options.reward_model}: the tokenizer has no pad token (batched scoring)"
            )
        funcs.append(
            AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, trust_remote_code=config.trust_remote_code
            )
        )
        classes.append(tokenizer)
    return funcs, classes


def train(options: GRPOOptions, config, model, tokenizer, rewards: tuple[list, list], train_dataset):
    from trl import GRPOTrainer, RLOOTrainer

    trainer_class = GRPOTrainer if options.algo == "grpo" else RLOOTrainer
    trainer = trainer_class(
        model=model,
        reward_funcs=rewards[0],
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        reward_processing_classes=rewards[1],
        peft_config=lora_config(options.rank, "CAUSAL_LM") if options.lora else None,
    )
    # The Auto class of `load_policy` has built the reference by now; the trackers store the config as JSON, which
    # a class is not (TensorBoard's callback would raise TypeError).
    (config.model_init_kwargs or {}).pop("architecture", None)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> dict:
    options, config = parse_args(argv)
    data = load_verifiable(options.data, options.max_examples)
    model, tokenizer, dtype = load_policy(options, config)
    rewards = reward_functions(options, config, dtype)
    held_out = list(data["validation"].select(range(min(options.eval_examples, len(data["validation"])))))

    start = time.perf_counter()
    before = exact_match(model, tokenizer, held_out, config.max_completion_length)
    print(f"held-out exact match before {options.algo.upper()}: {before['exact_match']:.1%}")
    with trainer_tensorboard_dir(options.out):
        trainer = train(options, config, model, tokenizer, rewards, data["train"])
    model = trainer.model.merge_and_unload() if options.lora else trainer.model
    after = exact_match(model, tokenizer, held_out, config.max_completion_length)
    minutes = (time.perf_counter() - start) / 60
    print(f"held-out exact match after {options.algo.upper()}: {after['exact_match']:.1%} ({minutes:.1f} min)")

    tiny_hf.save_model(model, tokenizer, options.out / "model")
    figures = summary_figures(options, config, data, held_out, before, after, trainer, minutes)
    write_summary(options.algo, figures, summary_markdown(figures), options.out, options.results)
    record_stage(options.out, options.algo, options, config)
    return figures


def summary_figures(options, config, data, held_out, before, after, trainer, minutes: float) -> dict:
    keys = LOGGED + tuple(f"rewards/{name}/mean" for name in trainer.reward_func_names)
    log = [{k: r[k] for k in ("step", *keys) if k in r} for r in trainer.state.log_history if "reward" in r]
    ties = [r["frac_reward_zero_std"] for r in log if "frac_reward_zero_std" in r]
    return {
        "model": options.model,
        "data": options.data,
        "algo": options.algo,
        "lora": options.lora,
        "rewards": list(trainer.reward_func_names),
        "beta": config.beta,
        "num_generations": config.num_generations,
        "max_completion_length": config.max_completion_length,
        "train_questions": len(data["train"]),
        "held_out_questions": len(held_out),
        "max_steps": config.max_steps,
        "batch_size": config.per_device_train_batch_size,
        "lr": config.learning_rate,
        "minutes": round(minutes, 2),
        # Share of prompt groups whose rewards all tie (zero std: zero advantage, no gradient), over the logged steps.
        "tied_group_share": sum(ties) / len(ties) if ties else None,
        "held_out_exact_match_before": before["exact_match"],
        "held_out_exact_match_after": after["exact_match"],
        "log": log,
        "samples": [
            {"question": r["prompt"][-1]["content"], "answer": r["answer"], "before": b, "after": a}
            for r, b, a in zip(held_out[:5], before["answers"], after["answers"], strict=False)
        ],
    }


def summary_markdown(figures: dict) -> str:
    ties = figures["tied_group_share"]
    reward_keys = [f"rewards/{name}/mean" for name in figures["rewards"]]
    lines = [
        f"# {figures['algo'].upper()}: {figures['model']} on `{figures['data']}`",
        "",
        f"{figures['train_questions']:,} training questions, {figures['max_steps']} steps of {figures['batch_size']} "
        f"completions ({figures['num_generations']} per question, at most {figures['max_completion_length']} tokens), "
        f"rewards {', '.join(figures['rewards'])}, beta {figures['beta']}, lr {figures['lr']}"
        f"{', LoRA' if figures['lora'] else ', full fine-tune'}, {figures['minutes']:.1f} minutes.",
        "",
        "| | held-out exact match (greedy) |",
        "|---|---:|",
        f"| before | {figures['held_out_exact_match_before']:.1%} |",
        f"| after | {figures['held_out_exact_match_after']:.1%} |",
        "",
        "Tied groups (every answer the same reward: zero advantage, no learning signal): "
        + (f"{ties:.1%} of prompt groups." if ties is not None else "not logged."),
        "",
        "| step | mean reward | " + " | ".join(reward_keys) + " | tied groups |",
        "|---:|---:|" + "---:|" * len(reward_keys) + "---:|",
    ]
    for r in figures["log"]:
        cells = " | ".join(f"{r.get(k, float('nan')):.3f}" for k in reward_keys)
        lines.append(f"| {r.get('step', '')} | {r['reward']:.3f} | {cells} | {r.get('frac_reward_zero_std', 0):.1%} |")
    lines += [
        "",
        f"Greedy answers to held-out questions ({figures['held_out_questions']} held out):",
        "",
        "| question | answer | before | after |",
        "|---|---|---|---|",
    ]
    for s in figures["samples"]:
        lines.append(
            "| " + " | ".join(markdown_cell(s[key]) for key in ("question", "answer", "before", "after")) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
