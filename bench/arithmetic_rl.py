"""Reinforcement learning on arithmetic: SFT, then GRPO, RLOO and our PPO from the same SFT start, by greedy exact
match on the same held-out questions, with 95% Wilson intervals and learning curves.

    bench/arithmetic_table.sh                       # trains everything, then runs this (about 40 minutes on 2 cores)
    tiny-hf bench arithmetic-rl --sft runs/arith/sft --run GRPO=runs/arith/grpo --run PPO=runs/arith/ppo

The task is alignment.data.arithmetic_dataset ("What is 3 4 7 + 5 8 9?" -> "9 3 6"); the held-out questions are
pairs no stage trained on. A method's gain over SFT counts as real only when the two intervals do not overlap
(tiny_hf.results.beyond_noise). Each run's kept checkpoints (TRL's `<out>/trainer/checkpoint-N`, PPO's
`<out>/checkpoints/step-N`) give the exact-match curve on `--curve-examples` questions; the training reward per step
comes from the run's own log (TRL's trainer_state.json, PPO's metrics.jsonl). KL(policy || SFT) is estimated as in
alignment/compare.py, on one sampled answer per prompt.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignment.compare import flatten_flags, greedy, kl_to_reference, load_policy, parse_named, training_minutes
from alignment.data import ARITHMETIC_KINDS, arithmetic_dataset, exact_match_reward, parse_task_spec
from tiny_hf.options import parse_options
from tiny_hf.results import RESULTS_DIR, beyond_noise, interval_cell, markdown_cell, wilson_interval, write_results

NAME = "arithmetic_rl"
# Tokens per answer: four spaced digits and the end of the turn, with room for a wrong, longer answer.
ANSWER_TOKENS = 12


@dataclass
class ArithmeticOptions:
    sft: str = field(default="runs/arith/sft", metadata={"help": "the SFT run every method started from"})
    run: list[str] = field(
        default_factory=list,
        metadata={"action": "append", "metavar": "NAME=RUN", "help": "an RL run from the SFT start (repeat)"},
    )
    task: str = field(default="arithmetic", metadata={"help": "the task spec the runs trained on"})
    held_out: int = field(default=1000, metadata={"help": "held-out questions for the final exact match"})
    curve_examples: int = field(default=300, metadata={"help": "held-out questions per checkpoint on the curves"})
    kl_examples: int = field(default=64, metadata={"help": "prompts for the KL estimate"})
    seed: int = field(default=0, metadata={"help": "seed of the KL estimate's samples"})
    results: Path = field(default=RESULTS_DIR, metadata={"help": "where arithmetic_rl.md/.json and the plot go"})
    name: str = field(default=NAME, metadata={"help": "the results files' name"})

    def __post_init__(self):
        self.run = flatten_flags(self.run)  # one list per `--run` from argparse (as compare's --policy)


def exact_match(model, tokenizer, rows: list[dict]) -> dict:
    """Greedy exact match on `rows` with its Wilson interval, overall and per kind, and the answers."""
    answers = greedy(model, tokenizer, rows, ANSWER_TOKENS)
    scores = exact_match_reward(answers, [r["answer"] for r in rows])
    by_kind = {}
    for kind in ARITHMETIC_KINDS:
        picked = [s for s, r in zip(scores, rows, strict=True) if r["kind"] == kind]
        if picked:
            by_kind[kind] = wilson_interval(int(sum(picked)), len(picked))
    return {"overall": wilson_interval(int(sum(scores)), len(scores)), "by_kind": by_kind, "answers": answers}


def checkpoints(run: str) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint a run kept: TRL's trainer/checkpoint-N or PPO's checkpoints/step-N."""
    found = [(int(p.name.split("-")[1]), p) for p in Path(run).glob("trainer/checkpoint-*")]
    found += [(int(p.name.split("-")[1]), p) for p in Path(run).glob("checkpoints/step-*")]
    return sorted(found)


def reward_log(run: str) -> list[tuple[int, float]]:
    """(step, mean training reward): TRL's logged `reward`, or PPO's `score` (the reward functions' sum, before the
    KL penalty, so that every method's curve is on the same scale)."""
    trainer_state = sorted(Path(run).glob("trainer/checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if trainer_state:
        history = json.loads(trainer_state[-1].read_text())["log_history"]
        return [(r["step"], r["reward"]) for r in history if "reward" in r]
    metrics = Path(run) / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return [(r["step"], r["score"]) for r in rows if "score" in r]
    return []


def measure(options: ArithmeticOptions) -> dict:
    parse_task_spec(options.task)
    runs = [parse_named(spec, "--run") for spec in options.run]
    rows = list(arithmetic_dataset(options.task, held_out_size=options.held_out)["validation"])
    curve_rows = rows[: options.curve_examples]
    reference, tokenizer = load_policy(options.sft)
    start = time.perf_counter()
    methods = {"SFT": {**exact_match(reference, tokenizer, rows), "kl": 0.0, "minutes": training_minutes(options.sft)}}
    print(f"SFT: {interval_cell(methods['SFT']['overall'], percent=True)}")
    curves = {}
    for name, run in runs:
        model, _ = load_policy(run)
        result = exact_match(model, tokenizer, rows)
        result["kl"] = kl_to_reference(
            model, reference, tokenizer, rows[: options.kl_examples], max_new_tokens=ANSWER_TOKENS, seed=options.seed
        )
        result["minutes"] = training_minutes(run)
        methods[name] = result
        curve = [{"step": 0, **_curve_point(reference, tokenizer, curve_rows)}]
        for step, folder in checkpoints(run):
            checkpoint, _ = load_policy(str(folder))
            curve.append({"step": step, **_curve_point(checkpoint, tokenizer, curve_rows)})
        curves[name] = {"exact_match": curve, "reward": reward_log(run)}
        print(f"{name}: {interval_cell(result['overall'], percent=True)}, KL {result['kl']:.2f}")
    return {
        "task": options.task,
        "held_out": len(rows),
        "curve_examples": len(curve_rows),
        "eval_minutes": round((time.perf_counter() - start) / 60, 2),
        "methods": methods,
        "curves": curves,
        "questions": [r["prompt"][-1]["content"] for r in rows],
        "answers": [r["answer"] for r in rows],
    }


def _curve_point(model, tokenizer, rows: list[dict]) -> dict:
    overall = exact_match(model, tokenizer, rows)["overall"]
    return {"exact_match": overall["rate"], "low": overall["low"], "high": overall["high"]}


def plot(figures: dict, path: Path) -> Path:
    """Held-out exact match (with its interval) and the training reward against the step, one line per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    for name, curve in figures["curves"].items():
        steps = [p["step"] for p in curve["exact_match"]]
        left.plot(steps, [100 * p["exact_match"] for p in curve["exact_match"]], marker="o", label=name)
        left.fill_between(
            steps, [100 * p["low"] for p in curve["exact_match"]], [100 * p["high"] for p in curve["exact_match"]],
            alpha=0.15,
        )  # fmt: skip
        if curve["reward"]:
            right.plot(*zip(*curve["reward"], strict=True), label=name)
    left.set(xlabel="step", ylabel="held-out exact match, % (95% interval)", title="greedy exact match")
    right.set(xlabel="step", ylabel="mean reward of sampled answers", title="training reward")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def summary_markdown(figures: dict, plot_name: str) -> str:
    methods = figures["methods"]
    sft = methods["SFT"]["overall"]
    kinds = list(methods["SFT"]["by_kind"])
    lines = [
        "# Reinforcement learning on arithmetic: one SFT start, the same held-out questions",
        "",
        f"Task `{figures['task']}` (alignment.data.arithmetic_dataset: spaced digits); "
        f"{figures['held_out']} held-out questions no stage trained on. Greedy exact match with its 95% Wilson "
        "interval; a gain over SFT is *beyond noise* only when the intervals do not overlap. KL(policy || SFT) in "
        "nats per answer from one sampled answer on each of the first 64 questions.",
        "",
        "| method | exact match (95% interval) | " + " | ".join(kinds) + " | vs SFT | KL | train min |",
        "|---|---:|" + "---:|" * len(kinds) + "---|---:|---:|",
    ]
    for name, result in methods.items():
        gain = result["overall"]["rate"] - sft["rate"]
        verdict = (
            "–"
            if name == "SFT"
            else f"{100 * gain:+.1f} points, "
            + ("beyond noise" if beyond_noise(result["overall"], sft) else "within noise")
        )
        cells = [interval_cell(result["by_kind"][k], percent=True) for k in kinds]
        minutes = "–" if result["minutes"] is None else f"{result['minutes']:.1f}"
        lines.append(
            f"| {name} | {interval_cell(result['overall'], percent=True)} | {' | '.join(cells)} | {verdict} | "
            f"{result['kl']:.2f} | {minutes} |"
        )
    lines += [
        "",
        f"Learning curves: exact match on the first {figures['curve_examples']} held-out questions at each kept "
        "checkpoint, and the mean reward of the sampled training answers.",
        "",
        f"![learning curves]({plot_name})",
        "",
        "Greedy answers to the first held-out questions:",
        "",
        "| question | answer | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for i in range(min(8, figures["held_out"])):
        cells = [markdown_cell(methods[name]["answers"][i], 40) for name in methods]
        lines.append(f"| {figures['questions'][i]} | {figures['answers'][i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(ArithmeticOptions, argv=argv, description=__doc__)
    figures = measure(options)
    options.results.mkdir(parents=True, exist_ok=True)
    plot_name = f"{options.name}.png"
    plot(figures, options.results / plot_name)
    write_results(options.name, figures, summary_markdown(figures, plot_name), options.results)
    return figures


if __name__ == "__main__":
    main()
