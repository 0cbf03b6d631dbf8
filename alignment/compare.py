"""One comparison of the alignment methods, from the same SFT start, on the same held-out prompts.

    tiny-hf compare --sft runs/sft --reward-model runs/reward \\
        --policy docs:DPO=runs/cmp/dpo --policy docs:PPO=runs/cmp/ppo-docs \\
        --policy verifiable:GRPO=runs/cmp/grpo-verifiable ... \\
        --trajectory "PPO=runs/cmp/ppo-docs" --trajectory "PPO, KL coef 0=runs/cmp/ppo-docs-kl0" \\
        --results bench/results

Every policy (`TASK:NAME=RUN`: what it was trained on, a label, its run or model folder) and the SFT model itself
are measured on both held-out sets:
- docs (alignment.data.preference_dataset's held-out prompts, "What does `json.dumps` do?"): the reward model's
  score of the greedy answer (what PPO/GRPO/RLOO maximised and DPO's data came from), ROUGE-L F1 of that answer
  against the true docstring summary (tiny_hf/metrics/rouge_l.py through `evaluate`: a metric the reward model never
  saw), and the answer's length in tokens;
- verifiable (alignment.data.verifiable_dataset's held-out questions): exact match of the greedy answer;
- KL(policy || SFT) in nats per answer, estimated on one sampled answer per prompt (temperature 1): the sum over
  its tokens of log pi(y_t) - log pi_SFT(y_t), averaged over prompts (an unbiased Monte-Carlo estimate).
Best-of-n is SFT sampling n answers per docs prompt and keeping the one the reward model scores highest: no training,
n times the inference; its KL is the analytic bound log n - (n - 1) / n (Stiennon et al. 2020, appendix).
Training time comes from each run's summary.json (`minutes`) or PPO's metrics.jsonl (rollout + scoring + update).
`--trajectory NAME=RUN` evaluates every checkpoint a PPO run kept (checkpoints/step-N) on the docs prompts and plots
reward-model score and ROUGE-L against KL to SFT: over-optimisation shows as a reward that keeps rising while the
independent metric stops or falls (Gao et al. 2022); a run with KL coefficient 0 is the reward-hacking demonstration.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import tiny_hf  # noqa: F401 (registers the "tiny" model type)
from alignment.data import exact_match_reward, preference_dataset, stable_subset, verifiable_dataset
from alignment.ppo import build_batch, stop_token_id
from alignment.reward import rewards
from alignment.rl import sequence_logprobs
from tiny_hf.chat import Reply, chat_generate, encode_prompts
from tiny_hf.metrics import load_rouge_l
from tiny_hf.options import parse_options
from tiny_hf.results import markdown_cell, write_results
from tiny_hf.runs import model_path

TASKS = ("docs", "verifiable")
PLOT_FILE = "alignment_overoptimization.png"
# Tokens per answer to a verifiable question (a module name or a number).
VERIFIABLE_TOKENS = 16


@dataclass
class CompareOptions:
    """The runs to compare, how many held-out prompts to measure them on, and where the table goes."""

    # models
    sft: str = field(default="runs/sft", metadata={"help": "the SFT run every method started from"})
    reward_model: str = field(default="runs/reward", metadata={"help": "the reward model (alignment/reward.py)"})
    policy: list[str] = field(
        default_factory=list,
        metadata={
            "action": "append",
            "metavar": "TASK:NAME=RUN",
            "help": f"a trained policy (repeat the flag for more); TASK ({'/'.join(TASKS)}): what it trained on",
        },
    )
    trajectory: list[str] = field(
        default_factory=list,
        metadata={
            "action": "append",
            "metavar": "NAME=RUN",
            "help": "a PPO run whose checkpoints are evaluated along the run (the over-optimisation plot)",
        },
    )
    # evaluation
    docs_examples: int = field(default=64, metadata={"help": "held-out docs prompts"})
    verifiable_examples: int | None = field(default=None, metadata={"help": "held-out questions (default all)"})
    kl_examples: int = field(default=64, metadata={"help": "prompts per task for the KL estimate"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per docs answer"})
    best_of_n: int = field(default=8, metadata={"help": "n for best-of-n with the reward model; 0 = off"})
    reward_max_length: int = field(default=512, metadata={"help": "tokens the reward model reads per answer"})
    seed: int = field(default=0, metadata={"help": "seeds the sampled answers (KL, best-of-n)"})
    # output
    out: Path = field(default=Path("runs/compare"), metadata={"help": "alignment.json/.md and the plot"})
    results: Path | None = field(default=None, metadata={"help": "also write alignment.md/.json + plot here"})

    def __post_init__(self):
        # argparse gives one list per `--policy` (it takes one or more values each); a --config file, strings
        self.policy = flatten_flags(self.policy)
        self.trajectory = flatten_flags(self.trajectory)

    @property
    def policies(self) -> list[tuple[str, str, str]]:
        return [parse_policy(spec) for spec in self.policy]

    @property
    def trajectories(self) -> list[tuple[str, str]]:
        return [parse_named(spec, "--trajectory") for spec in self.trajectory]


def flatten_flags(values: list) -> list[str]:
    """A repeatable flag's values as one list: argparse gives a list per use, a --config file plain strings."""
    return [v for group in values for v in ([group] if isinstance(group, str) else group)]


def parse_args(argv: list[str] | None = None) -> CompareOptions:
    (options,) = parse_options(CompareOptions, argv=argv, description=__doc__)
    return options


def parse_named(spec: str, flag: str) -> tuple[str, str]:
    name, sep, run = spec.rpartition("=")
    if not sep or not name.strip() or not run.strip():
        raise ValueError(f"{flag} {spec!r}: expected NAME=RUN")
    return name.strip(), run.strip()


def parse_policy(spec: str) -> tuple[str, str, str]:
    task, sep, rest = spec.partition(":")
    if not sep or task not in TASKS:
        raise ValueError(f"--policy {spec!r}: expected TASK:NAME=RUN with TASK one of {list(TASKS)}")
    name, run = parse_named(rest, "--policy")
    return task, name, run


def check_args(options: CompareOptions) -> None:
    for name in ("docs_examples", "kl_examples", "max_new_tokens"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(options, name)} must be at least 1")
    if options.best_of_n < 0 or options.best_of_n == 1:
        raise ValueError(f"--best-of-n={options.best_of_n}: 0 (off) or at least 2")
    policies, trajectories = options.policies, options.trajectories
    names = [name for _, name, _ in policies]
    if len(set(names)) < len(names) or "SFT" in names:
        raise ValueError(f"--policy names must be unique and not 'SFT' (the start): {names}")
    for _, name, run in [*policies, *((None, n, r) for n, r in trajectories)]:
        if not Path(run).exists():
            raise ValueError(f"{name}: no such run or model folder {run}")
    for name, run in trajectories:
        if not sorted((Path(run) / "checkpoints").glob("step-*")):
            raise ValueError(f"--trajectory {name}: {run} has no checkpoints/step-N (a PPO run with --save-every)")


def load_policy(run: str):
    path = model_path("--policy", run)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def training_minutes(run: str) -> float | None:
    """Minutes of training as the run recorded them: summary.json's `minutes`, else PPO's per-step seconds."""
    summary, metrics = Path(run) / "summary.json", Path(run) / "metrics.jsonl"
    if summary.exists() and "minutes" in (data := json.loads(summary.read_text())):
        return data["minutes"]
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        seconds = sum(r.get(k, 0.0) for r in rows for k in ("rollout_s", "scoring_s", "update_s"))
        return seconds / 60 if seconds else None
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------
def greedy(model, tokenizer, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers to the rows' chat prompts, ending at the end of the turn."""
    replies = chat_generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=max_new_tokens)
    return [reply.text for reply in replies]


def sample(model, tokenizer, rows: list[dict], *, max_new_tokens: int, seed: int, n: int = 1) -> list[Reply]:
    """n sampled answers (temperature 1) per row, row-major, ending at the policy's stop token (PPO's); one seed per
    request, so an answer does not depend on the batch it ran in."""
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    return chat_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        seeds=[seed * 1_000_003 + i for i in range(len(prompts))],
        stop_ids=[stop_token_id(tokenizer, None)],
        batch_size=64,
    )


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, rows: list[dict], *, max_new_tokens: int, seed: int) -> float:
    """Mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t) on one answer y ~ pi per prompt (nats per answer)."""
    responses = [r.token_ids for r in sample(policy, tokenizer, rows, max_new_tokens=max_new_tokens, seed=seed)]
    stop_id = stop_token_id(tokenizer, None)
    ids = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    total = 0.0
    for start in range(0, len(rows), 32):
        input_ids, attention_mask, response_mask, _ = build_batch(
            ids[start : start + 32], responses[start : start + 32], stop_id, tokenizer.pad_token_id
        )
        ours = sequence_logprobs(policy, input_ids, attention_mask, response_mask)
        theirs = sequence_logprobs(reference, input_ids, attention_mask, response_mask)
        total += (ours - theirs).sum().item()
    return total / len(rows)


class Judge:
    """The reward model and the independent metric, for answers to the docs prompts."""

    def __init__(self, reward_model: str, max_length: int):
        path = model_path("--reward-model", reward_model)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = max_length
        self.rouge = load_rouge_l()

    @torch.no_grad()
    def scores(self, rows: list[dict], answers: list[str]) -> list[float]:
        conversations = [
            r["prompt"] + [{"role": "assistant", "content": a}] for r, a in zip(rows, answers, strict=True)
        ]
        return rewards(self.model, self.tokenizer, conversations, self.max_length).tolist()

    def rouge_l(self, rows: list[dict], answers: list[str]) -> float:
        references = [r["chosen"][-1]["content"] for r in rows]
        return self.rouge.compute(predictions=answers, references=references)["rougeL_f1"]


def docs_metrics(judge: Judge, tokenizer, rows: list[dict], answers: list[str]) -> dict:
    return {
        "reward": sum(judge.scores(rows, answers)) / len(rows),
        "rouge_l": judge.rouge_l(rows, answers),
        "length": sum(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers) / len(rows),
    }


def verifiable_metrics(answers: list[str], rows: list[dict]) -> dict:
    scores = exact_match_reward(answers, [r["answer"] for r in rows])
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        picked = [s for s, r in zip(scores, rows, strict=True) if r["kind"] == kind]
        by_kind[kind] = sum(picked) / len(picked)
    return {"exact_match": sum(scores) / len(scores), "by_kind": by_kind}


def evaluate_policy(
    model, tokenizer, reference, judge: Judge, data: dict, options, *, verifiable: bool = True
) -> dict:
    """Greedy answers to the docs prompts (scored by the judge) and, with `verifiable`, to the verifiable questions
    (exact match), and KL to the reference on each task."""
    start = time.perf_counter()
    docs, questions, n = data["docs"], data["verifiable"], options.kl_examples
    docs_answers = greedy(model, tokenizer, docs, options.max_new_tokens)
    result = {"docs": docs_metrics(judge, tokenizer, docs, docs_answers), "docs_answers": docs_answers}
    result["kl_docs"] = kl_to_reference(
        model, reference, tokenizer, docs[:n], max_new_tokens=options.max_new_tokens, seed=options.seed
    )
    if verifiable:
        answers = greedy(model, tokenizer, questions, VERIFIABLE_TOKENS)
        result["verifiable"] = verifiable_metrics(answers, questions)
        result["verifiable_answers"] = answers
        result["kl_verifiable"] = kl_to_reference(
            model, reference, tokenizer, questions[:n], max_new_tokens=VERIFIABLE_TOKENS, seed=options.seed
        )
    result["eval_seconds"] = time.perf_counter() - start
    return result


def best_of_n(model, tokenizer, judge: Judge, rows: list[dict], options) -> dict:
    """SFT samples n answers per prompt; the reward model keeps its favourite."""
    start = time.perf_counter()
    n = options.best_of_n
    replies = sample(model, tokenizer, rows, max_new_tokens=options.max_new_tokens, seed=options.seed, n=n)
    texts = [r.text for r in replies]
    scores = judge.scores([r for r in rows for _ in range(n)], texts)
    best = [max(range(i * n, (i + 1) * n), key=lambda j: scores[j]) for i in range(len(rows))]
    answers = [texts[j] for j in best]
    return {
        "docs": docs_metrics(judge, tokenizer, rows, answers),
        "docs_answers": answers,
        "kl_docs": math.log(n) - (n - 1) / n,
        "minutes": (time.perf_counter() - start) / 60,
    }


def trajectory(name: str, run: str, reference, judge: Judge, data: dict, options) -> list[dict]:
    points = []
    for checkpoint in sorted((Path(run) / "checkpoints").glob("step-*")):
        model, tokenizer = load_policy(str(checkpoint))
        result = evaluate_policy(model, tokenizer, reference, judge, data, options, verifiable=False)
        step = int(checkpoint.name.removeprefix("step-"))
        points.append({"step": step, "kl": result["kl_docs"], **result["docs"]})
        print(
            f"{name} step {step}: reward {points[-1]['reward']:.3f} ROUGE-L {points[-1]['rouge_l']:.3f} "
            f"KL {points[-1]['kl']:.2f}"
        )
    return points


def plot_trajectories(trajectories: dict[str, list[dict]], start: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "reward", "reward-model score (what PPO maximises)"),
        (axes[1], "rouge_l", "ROUGE-L F1 vs the true summary (not seen by the RM)"),
    ):
        for name, points in trajectories.items():
            xs = [0.0] + [p["kl"] for p in points]
            ys = [start[key]] + [p[key] for p in points]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("KL(policy || SFT), nats per answer")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Over-optimisation along PPO on the docs task (points = checkpoints; the first = SFT)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def summary_markdown(figures: dict) -> str:
    lines = [
        "# Alignment: one comparison from the same SFT start",
        "",
        f"Start: `{figures['sft']}`; reward model `{figures['reward_model']}`. Held-out: {figures['docs_prompts']} "
        f'docs prompts ("What does `X` do?"), {figures["verifiable_questions"]} verifiable questions (modules and '
        f"sums). Reward-model score and ROUGE-L F1 (against the true docstring summary; the reward model never sees "
        f"it) of greedy answers; exact match of greedy answers; KL(policy || SFT) in nats per sampled answer "
        f"({figures['kl_prompts']} prompts per task); length in tokens.",
        "",
        *_methods_table(figures["rows"]),
    ]
    if figures.get("tied_groups"):
        lines += [
            "",
            "Share of GRPO/RLOO prompt groups whose rewards all tie (zero advantage: no signal): "
            + ", ".join(f"{k} {v:.0%}" for k, v in figures["tied_groups"].items())
            + ".",
        ]
    if figures.get("trajectories"):
        lines += ["", f"![over-optimisation]({PLOT_FILE})", "", *_trajectory_table(figures["trajectories"])]
    lines += ["", *_sample_tables(figures, [row["name"] for row in figures["rows"]])]
    return "\n".join(lines) + "\n"


def _methods_table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | trained on | RM score (docs) | ROUGE-L (docs) | exact match: modules / sums "
        "| KL docs / verifiable | length (docs) | train min |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        em = row.get("verifiable")
        em_cell = f"{em['by_kind'].get('module', 0):.1%} / {em['by_kind'].get('arithmetic', 0):.1%}" if em else "–"
        kl = f"{_num(row.get('kl_docs'), '.2f')} / {_num(row.get('kl_verifiable'), '.2f')}"
        lines.append(
            f"| {row['name']} | {row['trained_on']} | {row['docs']['reward']:.3f} | {row['docs']['rouge_l']:.3f} | "
            f"{em_cell} | {kl} | {row['docs']['length']:.1f} | {_num(row.get('minutes'), '.1f')} |"
        )
    return lines


def _trajectory_table(trajectories: dict[str, list[dict]]) -> list[str]:
    lines = ["| run | step | KL | RM score | ROUGE-L | length |", "|---|---:|---:|---:|---:|---:|"]
    for name, points in trajectories.items():
        lines += [
            f"| {name} | {p['step']} | {p['kl']:.2f} | {p['reward']:.3f} | {p['rouge_l']:.3f} | {p['length']:.1f} |"
            for p in points
        ]
    return lines


def _sample_tables(figures: dict, names: list[str]) -> list[str]:
    """The greedy answers of every method to a few held-out docs prompts and verifiable questions."""
    lines = [
        "Greedy answers to held-out docs prompts:",
        "",
        "| question | true summary | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for sample in figures["docs_samples"]:
        lines.append(
            f"| {markdown_cell(sample['question'], 50)} | {markdown_cell(sample['reference'], 70)} | "
            + " | ".join(markdown_cell(sample[n], 60) for n in names)
            + " |"
        )
    with_verifiable = [n for n in names if n in figures["verifiable_samples"][0]]
    lines += [
        "",
        "Greedy answers to held-out verifiable questions:",
        "",
        "| question | answer | " + " | ".join(with_verifiable) + " |",
        "|---" * (len(with_verifiable) + 2) + "|",
    ]
    for sample in figures["verifiable_samples"]:
        lines.append(
            f"| {markdown_cell(sample['question'], 60)} | {sample['answer']} | "
            + " | ".join(markdown_cell(sample[n], 30) for n in with_verifiable)
            + " |"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# The stage: setup, evaluate every method, finish
# ---------------------------------------------------------------------------------------------------------------------
def held_out_data(options: CompareOptions) -> dict:
    """The same held-out docs prompts and verifiable questions for every method (fixed subsets by hash of the id)."""
    docs = stable_subset(list(preference_dataset()["validation"]), options.docs_examples, key=lambda r: r["id"])
    verifiable = list(verifiable_dataset()["validation"])
    return {"docs": docs, "verifiable": stable_subset(verifiable, options.verifiable_examples, key=lambda r: r["id"])}


def evaluate_methods(options: CompareOptions, data: dict, judge: Judge, reference, tokenizer) -> tuple[list, dict]:
    """One row per method (SFT, best-of-n, each policy) and the tied-group share each GRPO/RLOO run recorded."""
    print("SFT ...")
    sft = evaluate_policy(reference, tokenizer, reference, judge, data, options)
    rows = [{"name": "SFT", "trained_on": "start", "minutes": training_minutes(options.sft), **sft}]
    if options.best_of_n:
        print(f"best-of-{options.best_of_n} ...")
        best = best_of_n(reference, tokenizer, judge, data["docs"], options)
        rows.append({"name": f"best-of-{options.best_of_n}", "trained_on": "docs (RM, inference only)", **best})
    tied = {}
    for task, name, run in options.policies:
        print(f"{name} ({run}) ...")
        model, policy_tokenizer = load_policy(run)
        result = evaluate_policy(model, policy_tokenizer, reference, judge, data, options)
        rows.append({"name": name, "trained_on": task, "run": run, "minutes": training_minutes(run), **result})
        summary = Path(run) / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("tied_group_share") is not None:
            tied[name] = json.loads(summary.read_text())["tied_group_share"]
    return rows, tied


def main(argv: list[str] | None = None) -> dict:
    options = parse_args(argv)
    check_args(options)
    torch.manual_seed(options.seed)
    data = held_out_data(options)
    judge = Judge(options.reward_model, options.reward_max_length)
    reference, tokenizer = load_policy(options.sft)

    rows, tied = evaluate_methods(options, data, judge, reference, tokenizer)
    trajectories = {name: trajectory(name, run, reference, judge, data, options) for name, run in options.trajectories}
    figures = comparison_figures(options, data, rows, tied, trajectories)
    write_comparison(options, figures, start=rows[0]["docs"])
    return figures


def comparison_figures(options: CompareOptions, data: dict, rows: list, tied: dict, trajectories: dict) -> dict:
    docs, verifiable = data["docs"], data["verifiable"]
    return {
        "sft": options.sft,
        "reward_model": options.reward_model,
        "docs_prompts": len(docs),
        "verifiable_questions": len(verifiable),
        "kl_prompts": options.kl_examples,
        "best_of_n": options.best_of_n,
        "rows": [{k: v for k, v in row.items() if not k.endswith("_answers")} for row in rows],
        "tied_groups": tied,
        "trajectories": trajectories,
        "docs_samples": [
            {
                "question": r["prompt"][-1]["content"],
                "reference": r["chosen"][-1]["content"],
                **{row["name"]: row["docs_answers"][i] for row in rows},
            }
            for i, r in enumerate(docs[:4])
        ],
        "verifiable_samples": [
            {
                "question": verifiable[i]["prompt"][-1]["content"],
                "answer": verifiable[i]["answer"],
                **{row["name"]: row["verifiable_answers"][i] for row in rows if "verifiable_answers" in row},
            }
            for i in range(0, len(verifiable), max(1, len(verifiable) // 6))[:6]  # spread over modules and sums
        ],
    }


def write_comparison(options: CompareOptions, figures: dict, start: dict) -> None:
    """alignment.json/.md (and the over-optimisation plot, starting at the SFT point `start`) under --out, and
    under --results when given."""
    table = summary_markdown(figures)
    for target in [options.out] + ([options.results] if options.results is not None else []):
        target.mkdir(parents=True, exist_ok=True)
        if figures["trajectories"]:
            plot_trajectories(figures["trajectories"], start | {"kl": 0.0}, target / PLOT_FILE)
    (options.out / "alignment.json").write_text(json.dumps(figures, indent=2) + "\n")
    (options.out / "alignment.md").write_text(table)
    if options.results is not None:
        write_results("alignment", figures, table, options.results)
    print(table)


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
