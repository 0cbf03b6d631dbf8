"""Speculative decoding: acceptance rate and speed-up of a draft + target over the target alone, greedy.

The target is a real chat model (SmolLM2-135M-Instruct by default, `tiny-hf fetch smollm2`); the drafts are its own
first layers (`layer_skip_draft`, self-speculative decoding), or any `--draft` model with the same vocabulary. Each
round answers the same chat questions with the target alone (the engine, eager) and with every (draft, k), in
alternating order; the outputs must be identical token for token, and the table says so.

    tiny-hf bench speculative                                   # runs/smollm2, drafts of 8 and 16 layers, k = 2, 4, 8
    tiny-hf bench speculative --draft-layers 4 --k 2 --rounds 1 --new-tokens 16   # a quick look

Speed-ups are ratios of wall time in one process (median and min-max over rounds); acceptance is the share of drafted
tokens the target kept, over all questions of all rounds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_hf.engine import Engine, SamplingParams, SpeculativeDecoder, layer_skip_draft
from tiny_hf.results import RESULTS_DIR, spread, write_results
from tiny_hf.runs import resolve_model

QUESTIONS = [
    "What does the json module do?",
    "Explain what a Python list is in two sentences.",
    "How do I open a file for reading?",
    "What is the difference between a tuple and a list?",
    "Write a function that returns the square of a number.",
    "What is a dictionary used for?",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("models")
    model.add_argument("--model", default="runs/smollm2", help="the target: a run or model folder, or a Hub id")
    model.add_argument("--draft", default=None, help="a draft model folder (same vocabulary) instead of layer skips")
    model.add_argument("--draft-layers", default="8,16", help="layer-skip drafts: the target's first N layers")
    work = parser.add_argument_group("workload")
    work.add_argument("--k", default="2,4,8", help="draft tokens per round")
    work.add_argument("--questions", type=int, default=len(QUESTIONS))
    work.add_argument("--new-tokens", type=int, default=64)
    work.add_argument("--rounds", type=int, default=3)
    work.add_argument("--threads", type=int, default=torch.get_num_threads())
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS_DIR)
    out.add_argument("--name", default="speculative_cpu", help="results file stem")
    return parser.parse_args(argv)


def drafts(target, args) -> dict:
    """name -> draft model."""
    if args.draft:
        path, _ = resolve_model(args.draft)
        return {Path(args.draft).name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()}
    total = target.config.num_hidden_layers
    return {
        f"first {n} of {total} layers": layer_skip_draft(target, n) for n in map(int, args.draft_layers.split(","))
    }


def timed(fn, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = [fn(p) for p in prompts]
    return time.perf_counter() - start, outputs


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    path, _ = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = Engine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, max_batch_size=1)
    target = engine.model  # the TinyForCausalLM the engine runs (from_llama for a stock Llama)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS[: args.questions]]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in messages]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    systems = {"target alone": lambda p: engine.generate([p], params)[0].token_ids}
    decoders = {}
    for name, draft in drafts(target, args).items():
        for k in map(int, args.k.split(",")):
            decoders[(name, k)] = SpeculativeDecoder(target, draft, num_speculative_tokens=k)
            systems[(name, k)] = lambda p, d=decoders[(name, k)]: d.generate(p, args.new_tokens)
    timed(systems["target alone"], prompts[:1])  # warm up
    seconds, outputs = {name: [] for name in systems}, {}
    for r in range(args.rounds):
        for name in systems if r % 2 == 0 else list(systems)[::-1]:
            spent, outputs[name] = timed(systems[name], prompts)
            seconds[name].append(spent)
        print(f"round {r + 1}: " + ", ".join(f"{n}: {seconds[n][-1]:.1f} s" for n in systems))
    same = {key: outputs[key] == outputs["target alone"] for key in decoders}  # the last round's, prompt for prompt
    return figures(args, seconds, decoders, same, len(prompts))


def figures(args, seconds: dict, decoders: dict, same: dict, questions: int) -> dict:
    base = seconds["target alone"]
    rows = [
        {
            "draft": name,
            "k": k,
            "acceptance": decoder.acceptance_rate,
            "tokens_per_target_forward": decoder.generated / decoder.target_forwards,
            "speedup": spread([b / s for b, s in zip(base, seconds[(name, k)], strict=True)]),
            "identical_to_target": same[(name, k)],
        }
        for (name, k), decoder in decoders.items()
    ]
    tokens = args.new_tokens * questions
    return {
        "model": args.model,
        "questions": questions,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "target_tokens_per_s": spread([tokens / s for s in base]),
        "rows": rows,
    }


def table(result: dict) -> str:
    t = result["target_tokens_per_s"]
    lines = [
        f"Speculative decoding, target {result['model']}, greedy, {result['questions']} chat questions x "
        f"{result['new_tokens']} tokens, {result['rounds']} rounds, {result['threads']} threads (fp32, eager).",
        "",
        f"Target alone: {t['median']:.1f} tokens/s ({t['min']:.1f}-{t['max']:.1f}).",
        "",
        "| draft | k | acceptance | tokens per target forward | speed-up vs target alone | same tokens |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        s = row["speedup"]
        lines.append(
            f"| {row['draft']} | {row['k']} | {row['acceptance']:.0%} | {row['tokens_per_target_forward']:.2f} | "
            f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) | {'yes' if row['identical_to_target'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    md = table(result)
    print(md)
    write_results(args.name, result, md, args.out)


if __name__ == "__main__":
    main()
