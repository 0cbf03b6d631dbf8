"""Chat data for fine-tuning and alignment, built locally and deterministically from the embedded corpus.

The instruction task: "What does `json.dumps` do?" -> the first paragraph of `json.dumps`'s docstring, for every
documented public function, class and method of the standard library. Questions come in a few phrasings (picked by
a hash of the name, so the set never changes). Held-out pairs are those of the modules that pretraining also held
out (the same hash rule as `tiny_hf.corpus.split_documents`), so a held-out answer was never seen in any training
stage.

    from alignment.data import load_chat_dataset
    ds = load_chat_dataset("embedded")          # DatasetDict(train, validation) with a "messages" column
    ds = load_chat_dataset("path/to/chats.jsonl") or load_chat_dataset("HuggingFaceH4/no_robots")

Rows are in TRL's conversational format (`messages`: a list of {"role", "content"}).

Two more tasks for alignment, from the same pairs and with the same held-out modules:
- preference (`preference_dataset`): `prompt` / `chosen` / `rejected`, where chosen is the real summary and
  rejected is a plausible wrong answer: another module's object's summary (a sibling's would often be just as
  right: `json.dump` vs `json.dumps`), the right summary cut short, or its opening words repeated (what a
  degenerate policy writes).
- verifiable (`verifiable_dataset`, `exact_match_reward`): "Which module defines `dumps`?" -> "json", asked only
  for names that one module defines, and "What is 17 + 25?" -> "42", so code can check the answer. Split by name,
  not by module: the answer is in the pretraining corpus (the module's documentation), and RL can only improve
  what pretraining put there; the sums are a skill SFT teaches partly, which leaves RL room to improve it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import sysconfig
import tokenize
from collections.abc import Callable
from pathlib import Path

import datasets

from tiny_hf.corpus import SKIP_DIRS, stable_fraction

REJECTION_KINDS = ("other", "truncated", "repetitive")
# What pretraining holds out by default (training/pretrain.py --val-fraction): the verifiable task asks only about
# the other modules, whose documentation the model has read.
PRETRAIN_VAL_FRACTION = 0.05
MODULE_QUESTION = "Which module of the Python standard library defines `{name}`?"
ARITHMETIC_QUESTION = "What is {a} + {b}?"
ARITHMETIC_MAX = 30

QUESTIONS = (
    "What does `{name}` do?",
    "Explain `{name}` in one or two sentences.",
    "What is `{name}` for?",
    "Describe what `{name}` does.",
)
MIN_ANSWER_CHARS, MAX_ANSWER_CHARS = 25, 320


def summary(docstring: str) -> str:
    """The docstring's first paragraph on one line: what a one-sentence answer about the object would say."""
    first = docstring.strip().split("\n\n", 1)[0]
    return re.sub(r"\s+", " ", first).strip()


def _stable_index(text: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % n


def stable_subset(items: list, max_examples: int | None, key: Callable[[object], str]) -> list:
    """A fixed pseudo-random subset of `max_examples` items (the lowest `stable_fraction` of `key`), in `key` order;
    all when None. The one way the alignment stages sample a quick run's data or an evaluation set."""
    if max_examples is None:
        return items
    return sorted(sorted(items, key=lambda item: stable_fraction(key(item)))[:max_examples], key=key)


def held_out_split(key: str, val_fraction: float) -> str:
    """The split of a row: "validation" (held out) when `stable_fraction(key)` falls under `val_fraction`, else
    "train". Every DatasetDict the project makes names its held-out split "validation", as pretraining does."""
    return "validation" if stable_fraction(key) < val_fraction else "train"


def train_and_held_out(splits, val_fraction: float, max_examples: int | None) -> datasets.DatasetDict:
    """A loaded source as {"train", "validation"}: its own held-out split ("validation", else "test"), or
    `val_fraction` of its first split held out; the train split cut to `max_examples`."""
    held_out = next((name for name in ("validation", "test") if name in splits), None)
    if held_out is None:
        first = splits[next(iter(splits))].train_test_split(test_size=val_fraction, seed=0)
        splits, held_out = {"train": first["train"], "test": first["test"]}, "test"
    train = splits["train"]
    if max_examples is not None:
        train = train.select(range(min(max_examples, len(train))))
    return datasets.DatasetDict({"train": train, "validation": splits[held_out]})


def docstring_pairs(stdlib_dir: str | None = None) -> list[dict]:
    """One {"module", "name", "question", "answer"} per documented public object of the standard library.

    Skipped: private names, summaries shorter than MIN_ANSWER_CHARS or longer than MAX_ANSWER_CHARS (a long first
    paragraph is a tutorial, not an answer), and summaries that only restate a signature.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    pairs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / filename
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            if any(part.startswith("_") for part in module.split(".")):
                continue
            try:
                with tokenize.open(path) as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue

            def visit(body: list[ast.stmt], prefix: str, module: str) -> None:
                for node in body:
                    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        continue
                    if node.name.startswith("_"):
                        continue
                    name = f"{prefix}{node.name}"
                    doc = ast.get_docstring(node)
                    answer = summary(doc) if doc else ""
                    if MIN_ANSWER_CHARS <= len(answer) <= MAX_ANSWER_CHARS and not answer.startswith(node.name + "("):
                        question = QUESTIONS[_stable_index(name, len(QUESTIONS))].format(name=name)
                        pairs.append({"module": module, "name": name, "question": question, "answer": answer})
                    if isinstance(node, ast.ClassDef):
                        visit(node.body, f"{name}.", module)

            visit(tree.body, f"{module}.", module)
    return pairs


def instruction_dataset(
    val_fraction: float = 0.05, max_examples: int | None = None, stdlib_dir: str | None = None
) -> datasets.DatasetDict:
    """The docstring Q&A pairs as a DatasetDict(train, validation) of chats; validation = the modules pretraining
    held out.

    Args:
        val_fraction: The held-out share of modules (pretraining's default is 0.05).
        max_examples: Keep a fixed pseudo-random subset of this size (by hash of the name), for quick runs.
        stdlib_dir: Read this folder instead of the running interpreter's standard library (tests).
    """
    pairs = docstring_pairs(stdlib_dir)
    pairs = stable_subset(pairs, max_examples, key=lambda p: p["name"])
    rows = {"train": [], "validation": []}
    for pair in pairs:
        rows[_split_of(pair, val_fraction)].append(
            {
                "id": pair["name"],
                "module": pair["module"],
                "task": "docs",
                "messages": [
                    {"role": "user", "content": pair["question"]},
                    {"role": "assistant", "content": pair["answer"]},
                ],
            }
        )
    if not rows["train"] or not rows["validation"]:
        raise ValueError(
            f"the instruction data has {len(rows['train'])} train and {len(rows['validation'])} held-out "
            f"pairs; use more modules or a larger val_fraction"
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})


def _load_files_or_hub(spec: str) -> datasets.DatasetDict:
    """A local .json/.jsonl file or folder of them, else a Hub dataset name (offline: only from the local cache)."""
    path = Path(spec)
    if not path.exists():
        return datasets.load_dataset(spec)
    files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.json*"))
    if not files:
        raise ValueError(f"--data {spec}: no .json or .jsonl files in the folder")
    if not any(Path(f).read_text(encoding="utf-8").strip() for f in files):
        raise ValueError(f"--data {spec}: no rows (the file is empty)")
    return datasets.load_dataset("json", data_files=files)


def embedded_chat_dataset(
    val_fraction: float = 0.05, max_examples: int | None = None, stdlib_dir: str | None = None
) -> datasets.DatasetDict:
    """What SFT trains on by default: the docstring Q&A (`task` "docs") and the verifiable module questions (`task`
    "verifiable", answered "`json`"), each with its own held-out split. SFT teaches the verifiable task's answer
    format, so the RL stages start from a model that gets part of it right and can only improve the rest."""
    docs = instruction_dataset(val_fraction, max_examples, stdlib_dir)
    verifiable = verifiable_dataset(max_examples=max_examples, stdlib_dir=stdlib_dir)

    def as_chat(row: dict) -> dict:
        # `module` holds the checked answer here: the defining module, or the sum for an arithmetic question
        return {
            "id": row["id"],
            "module": row["answer"],
            "task": "verifiable",
            "messages": row["prompt"] + row["completion"],
        }

    return datasets.DatasetDict(
        {
            split: datasets.concatenate_datasets(
                [
                    docs[split],
                    verifiable[split].map(
                        as_chat, remove_columns=[c for c in verifiable[split].column_names if c != "id"]
                    ),
                ]
            )
            for split in ("train", "validation")
        }
    )


def load_chat_dataset(spec: str, val_fraction: float = 0.05, max_examples: int | None = None) -> datasets.DatasetDict:
    """`embedded` (the docstring Q&A), `arithmetic[:kinds]` (`arithmetic_dataset`), a local .json/.jsonl file or
    folder, or a Hub dataset name; rows must have
    `messages` (or `prompt` + `completion`, TRL's prompt-completion format). A source without a held-out
    split (validation or test) is split by `val_fraction`."""
    if spec == "embedded":
        return embedded_chat_dataset(val_fraction, max_examples)
    if spec.partition(":")[0] == "arithmetic":
        return arithmetic_dataset(spec, train_size=max_examples).map(
            lambda row: {"module": row["answer"], "task": "verifiable", "messages": row["prompt"] + row["completion"]},
            remove_columns=["prompt", "completion", "answer"],
        )
    loaded = _load_files_or_hub(spec)
    columns = set(loaded[next(iter(loaded))].column_names)
    if "messages" not in columns and not {"prompt", "completion"} <= columns:
        raise ValueError(f"--data {spec}: rows need 'messages' or 'prompt' + 'completion'; found {sorted(columns)}")
    return train_and_held_out(loaded, val_fraction, max_examples)


def _split_of(pair: dict, val_fraction: float) -> str:
    """The instruction data's split rule: a pair is held out when pretraining held out its module (the key
    `tiny_hf.corpus` gives the module's document)."""
    return held_out_split(f"stdlib/{pair['module']}", val_fraction)


def _rejected(pair: dict, kind: str, everyone: list[dict]) -> str:
    """A wrong answer of the given kind for `pair` (deterministic)."""
    words = pair["answer"].split()
    if kind == "truncated":
        return " ".join(words[: max(2, len(words) // 3)])
    if kind == "repetitive":
        opening = " ".join(words[:3])
        return " ".join([opening] * 4)
    if all(p["module"] == pair["module"] for p in everyone):
        raise ValueError("the preference data needs objects from at least two modules for its 'other' rejections")
    other = everyone[_stable_index(pair["name"] + "/other", len(everyone))]
    while other["module"] == pair["module"] or other["answer"] == pair["answer"]:  # a different topic, not a sibling
        other = everyone[(everyone.index(other) + 1) % len(everyone)]
    return other["answer"]


def preference_dataset(
    val_fraction: float = 0.05, max_examples: int | None = None, stdlib_dir: str | None = None
) -> datasets.DatasetDict:
    """Preference pairs in TRL's conversational format: `prompt` (the user turn), `chosen` / `rejected` (one
    assistant turn each), plus `kind` (which REJECTION_KINDS made the rejected answer), `id` and `module`.
    Held out: the same modules as the instruction data. Chosen never equals rejected."""
    pairs = docstring_pairs(stdlib_dir)
    pairs = stable_subset(pairs, max_examples, key=lambda p: p["name"])
    rows = {"train": [], "validation": []}
    for pair in pairs:
        kind = REJECTION_KINDS[_stable_index(pair["name"] + "/kind", len(REJECTION_KINDS))]
        rejected = _rejected(pair, kind, pairs)
        if rejected == pair["answer"]:
            continue
        rows[_split_of(pair, val_fraction)].append(
            {
                "id": pair["name"],
                "module": pair["module"],
                "kind": kind,
                "prompt": [{"role": "user", "content": pair["question"]}],
                "chosen": [{"role": "assistant", "content": pair["answer"]}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    if not rows["train"] or not rows["validation"]:
        raise ValueError(
            f"the preference data has {len(rows['train'])} train and {len(rows['validation'])} held-out "
            f"pairs; use more modules or a larger val_fraction"
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})


def verifiable_dataset(
    val_fraction: float = 0.1, max_examples: int | None = None, stdlib_dir: str | None = None
) -> datasets.DatasetDict:
    """Questions whose answer code can check, in TRL's prompt-completion format (`prompt`, `completion`, `answer`
    for `exact_match_reward`, `kind`), split by a hash of the id:
    - "module": "Which module defines `name`?" for public top-level functions and classes whose short name one
      module defines, from the modules pretraining trained on (knowledge the model may or may not have kept);
    - "arithmetic": "What is 17 + 25?" for operands 0..ARITHMETIC_MAX (a skill SFT teaches partly, so RL has room).
    """
    pairs = [p for p in docstring_pairs(stdlib_dir) if p["name"].count(".") == p["module"].count(".") + 1]
    pairs = [p for p in pairs if _split_of(p, PRETRAIN_VAL_FRACTION) == "train"]
    modules_of: dict[str, set[str]] = {}
    for pair in pairs:
        modules_of.setdefault(pair["name"].rsplit(".", 1)[1], set()).add(pair["module"])
    questions = [
        (
            pair["name"],
            "module",
            MODULE_QUESTION.format(name=pair["name"].rsplit(".", 1)[1]),
            pair["module"],
            f"`{pair['module']}`",
        )
        for pair in pairs
        if len(modules_of[pair["name"].rsplit(".", 1)[1]]) == 1
    ]
    questions += [
        (f"add/{a}+{b}", "arithmetic", ARITHMETIC_QUESTION.format(a=a, b=b), str(a + b), str(a + b))
        for a in range(ARITHMETIC_MAX + 1)
        for b in range(ARITHMETIC_MAX + 1)
    ]
    questions = stable_subset(questions, max_examples, key=lambda q: q[0])
    rows = {"train": [], "validation": []}
    for id_, kind, question, answer, completion in questions:
        rows[held_out_split("verifiable/" + id_, val_fraction)].append(
            {
                "id": id_,
                "kind": kind,
                "answer": answer,
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": completion}],
            }
        )
    if not rows["train"] or not rows["validation"]:
        raise ValueError(
            f"the verifiable data has {len(rows['train'])} train and {len(rows['validation'])} held-out "
            f"questions; use more modules or a larger val_fraction"
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})


def extract_answer(text: str) -> str | None:
    """The first integer or dotted Python name in a response: "`json`" -> "json", "json.decoder, I think" ->
    "json.decoder", "42." -> "42", and a number in spaced digits (`spell_digits`) read whole: "9 3 6" -> "936"."""
    pattern = r"-?(?:\d(?: \d)+|\d+)|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
    match = re.search(pattern, text.replace("`", " "))
    return match.group(0).rstrip(".").replace(" ", "") if match else None


def exact_match_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the first name or number in a completion is the answer, else 0.0. TRL's reward-function signature:
    completions are strings or conversational ([{"role": "assistant", "content": ...}]); `answer` is the dataset
    column of the same name."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        scores.append(1.0 if extract_answer(text) == expected else 0.0)
    return scores


def partial_credit_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """A shaped version of `exact_match_reward` for groups whose answers are all wrong (they carry no signal): 1.0
    for the exact answer; for a number, 1 - |error| / 10 (0 from ten off), so "41" for 42 beats "8"; for a dotted
    name, 0.5 when the top-level package is right ("xml.dom" for "xml.sax"). Exact match stays the metric: a shaped
    reward can be gamed (always answering the middle of the range scores on every sum), which is why it is only ever
    reported beside exact match."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        got = extract_answer(text)
        if got is None:
            scores.append(0.0)
        elif got == expected:
            scores.append(1.0)
        elif re.fullmatch(r"-?\d+", expected) and re.fullmatch(r"-?\d+", got):
            scores.append(max(0.0, 1.0 - abs(int(got) - int(expected)) / 10))
        else:
            scores.append(0.5 if got.split(".")[0] == expected.split(".")[0] else 0.0)
    return scores


def digit_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """A shaped reward for numeric answers: the share of digit places (aligned from the ones place) where the
    completion's number agrees with the answer, over the longer of the two; 1.0 only for the exact answer. A near
    miss ("9 2" for 91) scores 0.5 instead of 0, so groups whose answers are all wrong still rank them; exact match
    stays the metric. Non-numeric expected answers fall back to exact match."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        got = extract_answer(text) or ""
        if not (got.isdigit() and expected.isdigit()):
            scores.append(1.0 if got == expected else 0.0)
            continue
        width = max(len(got), len(expected))
        scores.append(sum(a == b for a, b in zip(got[::-1], expected[::-1], strict=False)) / width)
    return scores


def _as_turns(value, role: str) -> list[dict]:
    """A TRL field as a list of chat turns: strings (standard format) become one turn of `role`."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def load_preference_dataset(
    spec: str, val_fraction: float = 0.05, max_examples: int | None = None
) -> datasets.DatasetDict:
    """`embedded` (the docs preference pairs), a local .json/.jsonl file or folder, or a Hub dataset name, in TRL's
    preference formats (`prompt` + `chosen` + `rejected`, or `chosen` + `rejected` with the prompt inside them;
    strings or conversations). Returned conversational, with `prompt` ([] when implicit). Rows with a missing or
    empty field, or with chosen == rejected, raise a ValueError naming the first one, before anything trains."""
    if spec == "embedded":
        return preference_dataset(val_fraction, max_examples)
    loaded = _load_files_or_hub(spec)
    splits = {}
    for split, rows in loaded.items():
        if missing := {"chosen", "rejected"} - set(rows.column_names):
            raise ValueError(f"--data {spec}: preference rows need 'chosen' and 'rejected'; {sorted(missing)} missing")
        fixed = []
        for i, row in enumerate(rows):
            for field in ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected"):
                if not row[field]:
                    raise ValueError(f"--data {spec}: {split} row {i} has an empty or missing {field!r}")
            if row["chosen"] == row["rejected"]:
                raise ValueError(f"--data {spec}: {split} row {i} has chosen == rejected, which teaches nothing")
            prompt = _as_turns(row["prompt"], "user") if row.get("prompt") else []
            fixed.append(
                {
                    **row,
                    "prompt": prompt,
                    "chosen": _as_turns(row["chosen"], "assistant"),
                    "rejected": _as_turns(row["rejected"], "assistant"),
                }
            )
        splits[split] = datasets.Dataset.from_list(fixed)
    return train_and_held_out(splits, val_fraction, max_examples)


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic: a verifiable skill a 3M-parameter model can partly learn in CPU minutes
# ---------------------------------------------------------------------------------------------------------------------
# Each kind: (question template, answer of (a, b)). Subtraction takes the larger number first, so every answer is a
# non-negative integer; comparison answers with the larger number.
ARITHMETIC_KINDS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("What is {a} + {b}?", lambda a, b: a + b),
    "sub": ("What is {a} - {b}?", lambda a, b: a - b),
    "cmp": ("Which is larger, {a} or {b}?", max),
}


def spell_digits(n: int) -> str:
    """`347` -> `"3 4 7"`: one digit per token. The BPE vocabulary merges digits unevenly ("347" is "3", "47"; "936"
    is "9", "36"), so a model would have to learn each merged token's digits before it could add; spaced digits give
    one token each, the formatting small transformers learn arithmetic from (Lee et al. 2023, "Teaching Arithmetic
    to Small Transformers"; Llama's tokenizer splits digits for the same reason)."""
    return " ".join(str(n))


def parse_task_spec(spec: str) -> tuple[str, list[str]]:
    """`"arithmetic"` or `"arithmetic:add,cmp"` -> ("arithmetic", kinds). An unknown or empty kind raises a
    ValueError naming the allowed ones, before anything loads."""
    name, colon, rest = spec.partition(":")
    kinds = [k.strip() for k in rest.split(",")] if colon else list(ARITHMETIC_KINDS)
    for kind in kinds:
        if kind not in ARITHMETIC_KINDS:
            raise ValueError(f"task {spec!r}: kind {kind!r} is not one of {list(ARITHMETIC_KINDS)}")
    return name, kinds


def arithmetic_dataset(
    spec: str = "arithmetic",
    max_value: int = 99,
    train_size: int | None = None,
    held_out_size: int | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Arithmetic questions in TRL's prompt-completion format (`prompt`, `completion`, `answer` for
    `exact_match_reward`, `kind`, `id`): "What is 3 4 7 + 5 8 9?" -> "9 3 6", operands 0..`max_value`, kinds from
    `spec` in turn. Train and held-out questions never share an (a, b, kind): held out by a hash of the question, so
    the split does not depend on the sizes. Deterministic by `seed`.

    Args:
        spec: "arithmetic" (every kind of ARITHMETIC_KINDS) or "arithmetic:add,sub".
        max_value: The largest operand.
        train_size: Training questions (default, and at most: what the operands allow).
        held_out_size: Held-out questions (default 1,000, or what the operands allow).
    """
    _, kinds = parse_task_spec(spec)
    pairs = (max_value + 1) ** 2 * len(kinds)
    held_out_size = min(1_000, pairs // 30) if held_out_size is None else held_out_size
    train_size = pairs * 9 // 30 if train_size is None else train_size
    if train_size < 1 or held_out_size < 1:
        raise ValueError(f"train_size={train_size} and held_out_size={held_out_size} must both be >= 1")
    # About a tenth of all (kind, a, b) is held out by the hash; draw at most a third of each share, so that
    # sampling without repeats stays quick (subtraction's ordered pairs are only half of them).
    if held_out_size > pairs // 30:
        raise ValueError(
            f"held_out_size={held_out_size} is over {pairs // 30} for operands up to {max_value}; raise max_value"
        )
    train_size = min(train_size, pairs * 9 // 30)
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {"train": [], "validation": []}
    wanted = {"train": train_size, "validation": held_out_size}
    seen: set[str] = set()
    while len(rows["train"]) < train_size or len(rows["validation"]) < held_out_size:
        kind = kinds[len(seen) % len(kinds)]
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        if kind == "sub":
            a, b = max(a, b), min(a, b)
        id_ = f"{kind}/{a}/{b}"
        split = held_out_split("arithmetic/" + id_, 0.1)
        if id_ in seen or len(rows[split]) >= wanted[split]:
            continue
        seen.add(id_)
        template, compute = ARITHMETIC_KINDS[kind]
        answer = compute(a, b)
        rows[split].append(
            {
                "id": id_,
                "kind": kind,
                "answer": str(answer),
                "prompt": [{"role": "user", "content": template.format(a=spell_digits(a), b=spell_digits(b))}],
                "completion": [{"role": "assistant", "content": spell_digits(answer)}],
            }
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})
