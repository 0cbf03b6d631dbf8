"""One comparison of the alignment methods, from the same SFT start, on the same held-out prompts.

    python alignment/compare.py --sft runs/sft --reward-model runs/reward \\
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

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import tiny_hf  # noqa: F401 (registers the "tiny" model type)
from alignment.data import _subset, exact_match_reward, preference_dataset, verifiable_dataset
from alignment.grpo import greedy_answers
from alignment.ppo import build_batch, generate_responses, make_engine, stop_token_id
from alignment.reward import rewards
from alignment.rl import sequence_logprobs
from tiny_hf.metrics import load_rouge_l
from tiny_hf.results import markdown_cell, write_results
from tiny_hf.runs import model_path

TASKS = ("docs", "verifiable")
PLOT_FILE = "alignment_overoptimization.png"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument("--sft", default="runs/sft", help="the SFT run every method started from")
    models.add_argument("--reward-model", default="runs/reward", help="the reward model (alignment/reward.py)")
    models.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="TASK:NAME=RUN",
        help=f"a trained policy; TASK ({'/'.join(TASKS)}): what it trained on",
    )
    models.add_argument(
        "--trajectory",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="a PPO run whose checkpoints are evaluated along the run (the over-optimisation plot)",
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--docs-examples", type=int, default=64, help="held-out docs prompts")
    evaluation.add_argument("--verifiable-examples", type=int, default=None, help="held-out questions (default all)")
    evaluation.add_argument("--kl-examples", type=int, default=64, help="prompts per task for the KL estimate")
    evaluation.add_argument("--max-new-tokens", type=int, default=48, help="tokens per docs answer")
    evaluation.add_argument("--best-of-n", type=int, default=8, help="n for best-of-n with the reward model; 0 = off")
    evaluation.add_argument("--reward-max-length", type=int, default=512)
    evaluation.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/compare"), help="alignment.json/.md and the plot")
    out.add_argument("--results", type=Path, default=None, help="also write alignment.md/.json + plot here")
    args = parser.parse_args(argv)
    args.policies = [parse_policy(spec) for spec in args.policy]
    args.trajectories = [parse_named(spec, "--trajectory") for spec in args.trajectory]
    return args


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


def check_args(args: argparse.Namespace) -> None:
    for name in ("docs_examples", "kl_examples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.best_of_n < 0 or args.best_of_n == 1:
        raise ValueError(f"--best-of-n={args.best_of_n}: 0 (off) or at least 2")
    names = [name for _, name, _ in args.policies]
    if len(set(names)) < len(names) or "SFT" in names:
        raise ValueError(f"--policy names must be unique and not 'SFT' (the start): {names}")
    for _, name, run in [*args.policies, *((None, n, r) for n, r in args.trajectories)]:
        if not Path(run).exists():
            raise ValueError(f"{name}: no such run or model folder {run}")
    for name, run in args.trajectories:
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
def prompt_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    return [
        list(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
        for r in rows
    ]


@torch.no_grad()
def sample(model, tokenizer, rows: list[dict], *, max_new_tokens: int, seed: int, n: int = 1) -> list[list[int]]:
    """n sampled answers (temperature 1, token ids with the stop token) per row, row-major; seeded per request."""
    stop_id = stop_token_id(tokenizer, None)
    ids = [p for p in prompt_ids(tokenizer, rows) for _ in range(n)]
    seeds = [seed * 1_000_003 + i for i in range(len(ids))]
    engine = make_engine(model, tokenizer, min(len(ids), 64))
    return generate_responses(
        model,
        tokenizer,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        stop_id=stop_id,
        seeds=seeds,
        engine=engine,
    )


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, rows: list[dict], *, max_new_tokens: int, seed: int) -> float:
    """Mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t) on one answer y ~ pi per prompt (nats per answer)."""
    responses = sample(policy, tokenizer, rows, max_new_tokens=max_new_tokens, seed=seed)
    stop_id = stop_token_id(tokenizer, None)
    ids = prompt_ids(tokenizer, rows)
    total = 0.0
    for start in range(0, len(rows), 32):
        input_ids, attention_mask, response_mask, _ = build_batch(
            ids[start : start + 32], responses[start : start + 32], stop_id, tokenizer.pad_token_id
        )
        ours = sequence_logprobs(policy, input_ids, attention_mask, response_mask)
        theirs = sequence_logprobs(reference, input_ids, attention_mask, response_mask)
        total += (ours - theirs).sum().item()
    return total / len(rows)


def texts_of(tokenizer, responses: list[list[int]]) -> list[str]:
    stop_id = stop_token_id(tokenizer, None)
    return [tokenizer.decode([t for t in r if t != stop_id], skip_special_tokens=True).strip() for r in responses]


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


def evaluate_policy(model, tokenizer, reference, judge: Judge, data: dict, args, *, verifiable: bool = True) -> dict:
    start = time.perf_counter()
    docs_answers = greedy_answers(model, tokenizer, [r["prompt"] for r in data["docs"]], args.max_new_tokens)
    result = {"docs": docs_metrics(judge, tokenizer, data["docs"], docs_answers), "docs_answers": docs_answers}
    result["kl_docs"] = kl_to_reference(
        model,
        reference,
        tokenizer,
        data["docs"][: args.kl_examples],
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if verifiable:
        answers = greedy_answers(model, tokenizer, [r["prompt"] for r in data["verifiable"]], 16)
        result["verifiable"] = verifiable_metrics(answers, data["verifiable"])
        result["verifiable_answers"] = answers
        result["kl_verifiable"] = kl_to_reference(
            model, reference, tokenizer, data["verifiable"][: args.kl_examples], max_new_tokens=16, seed=args.seed
        )
    result["eval_seconds"] = time.perf_counter() - start
    return result


def best_of_n(model, tokenizer, judge: Judge, rows: list[dict], args) -> dict:
    """SFT samples n answers per prompt; the reward model keeps its favourite."""
    start = time.perf_counter()
    n = args.best_of_n
    texts = texts_of(
        tokenizer, sample(model, tokenizer, rows, max_new_tokens=args.max_new_tokens, seed=args.seed, n=n)
    )
    scores = judge.scores([r for r in rows for _ in range(n)], texts)
    best = [max(range(i * n, (i + 1) * n), key=lambda j: scores[j]) for i in range(len(rows))]
    answers = [texts[j] for j in best]
    return {
        "docs": docs_metrics(judge, tokenizer, rows, answers),
        "docs_answers": answers,
        "kl_docs": math.log(n) - (n - 1) / n,
        "minutes": (time.perf_counter() - start) / 60,
    }


def trajectory(name: str, run: str, reference, judge: Judge, data: dict, args) -> list[dict]:
    points = []
    for checkpoint in sorted((Path(run) / "checkpoints").glob("step-*")):
        model, tokenizer = load_policy(str(checkpoint))
        result = evaluate_policy(model, tokenizer, reference, judge, data, args, verifiable=False)
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
    rows = figures["rows"]
    lines = [
        "# Alignment: one comparison from the same SFT start",
        "",
        f"Start: `{figures['sft']}`; reward model `{figures['reward_model']}`. Held-out: {figures['docs_prompts']} "
        f'docs prompts ("What does `X` do?"), {figures["verifiable_questions"]} verifiable questions (modules and '
        f"sums). Reward-model score and ROUGE-L F1 (against the true docstring summary; the reward model never sees "
        f"it) of greedy answers; exact match of greedy answers; KL(policy || SFT) in nats per sampled answer "
        f"({figures['kl_prompts']} prompts per task); length in tokens.",
        "",
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
    if figures.get("tied_groups"):
        lines += [
            "",
            "Share of GRPO/RLOO prompt groups whose rewards all tie (zero advantage: no signal): "
            + ", ".join(f"{k} {v:.0%}" for k, v in figures["tied_groups"].items())
            + ".",
        ]
    if figures.get("trajectories"):
        lines += [
            "",
            f"![over-optimisation]({PLOT_FILE})",
            "",
            "| run | step | KL | RM score | ROUGE-L | length |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, points in figures["trajectories"].items():
            lines += [
                f"| {name} | {p['step']} | {p['kl']:.2f} | {p['reward']:.3f} | {p['rouge_l']:.3f} | "
                f"{p['length']:.1f} |"
                for p in points
            ]
    names = [row["name"] for row in rows]
    lines += [
        "",
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
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    docs = list(preference_dataset()["test"])
    docs = _subset(docs, args.docs_examples, key=lambda r: r["id"])
    verifiable = list(verifiable_dataset()["test"])
    verifiable = _subset(verifiable, args.verifiable_examples, key=lambda r: r["id"])
    data = {"docs": docs, "verifiable": verifiable}
    judge = Judge(args.reward_model, args.reward_max_length)
    reference, tokenizer = load_policy(args.sft)

    rows = []
    print("SFT ...")
    sft = evaluate_policy(reference, tokenizer, reference, judge, data, args)
    rows.append({"name": "SFT", "trained_on": "start", "minutes": training_minutes(args.sft), **sft})
    if args.best_of_n:
        print(f"best-of-{args.best_of_n} ...")
        best = best_of_n(reference, tokenizer, judge, docs, args)
        rows.append({"name": f"best-of-{args.best_of_n}", "trained_on": "docs (RM, inference only)", **best})
    tied = {}
    for task, name, run in args.policies:
        print(f"{name} ({run}) ...")
        model, policy_tokenizer = load_policy(run)
        result = evaluate_policy(model, policy_tokenizer, reference, judge, data, args)
        rows.append({"name": name, "trained_on": task, "run": run, "minutes": training_minutes(run), **result})
        summary = Path(run) / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("tied_group_share") is not None:
            tied[name] = json.loads(summary.read_text())["tied_group_share"]
    trajectories = {name: trajectory(name, run, reference, judge, data, args) for name, run in args.trajectories}

    figures = {
        "sft": args.sft,
        "reward_model": args.reward_model,
        "docs_prompts": len(docs),
        "verifiable_questions": len(verifiable),
        "kl_prompts": args.kl_examples,
        "best_of_n": args.best_of_n,
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
    table = summary_markdown(figures)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [args.out] + ([args.results] if args.results is not None else [])
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        if trajectories:
            plot_trajectories(trajectories, sft["docs"] | {"kl": 0.0}, target / PLOT_FILE)
    (args.out / "alignment.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "alignment.md").write_text(table)
    if args.results is not None:
        write_results("alignment", figures, table, args.results)
    print(table)
    return figures


if __name__ == "__main__":
    main()
