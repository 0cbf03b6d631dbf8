"""Chat data for fine-tuning and alignment, built locally and deterministically from the embedded corpus.

The instruction task: "What does `json.dumps` do?" -> the first paragraph of `json.dumps`'s docstring, for every
documented public function, class and method of the standard library. Questions come in a few phrasings (picked by
a hash of the name, so the set never changes). Held-out pairs are those of the modules that pretraining also held
out (the same hash rule as `tiny_hf.corpus.split_documents`), so a held-out answer was never seen in any training
stage.

    from alignment.data import load_chat_dataset
    ds = load_chat_dataset("embedded")          # DatasetDict(train, test) with a "messages" column
    ds = load_chat_dataset("path/to/chats.jsonl") or load_chat_dataset("HuggingFaceH4/no_robots")

Rows are in TRL's conversational format (`messages`: a list of {"role", "content"}).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
import tokenize
from pathlib import Path

import datasets

from tiny_hf.corpus import SKIP_DIRS, _stable_fraction

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


def instruction_dataset(val_fraction: float = 0.05, max_examples: int | None = None,
                        stdlib_dir: str | None = None) -> datasets.DatasetDict:  # fmt: skip
    """The docstring Q&A pairs as a DatasetDict(train, test) of chats; test = the modules pretraining held out.

    Args:
        val_fraction: The held-out share of modules (pretraining's default is 0.05).
        max_examples: Keep a fixed pseudo-random subset of this size (by hash of the name), for quick runs.
        stdlib_dir: Read this folder instead of the running interpreter's standard library (tests).
    """
    pairs = docstring_pairs(stdlib_dir)
    if max_examples is not None:
        pairs = sorted(pairs, key=lambda p: _stable_fraction(p["name"]))[:max_examples]
        pairs.sort(key=lambda p: p["name"])
    rows = {"train": [], "test": []}
    for pair in pairs:
        split = "test" if _stable_fraction(f"stdlib/{pair['module']}") < val_fraction else "train"
        rows[split].append({
            "id": pair["name"],
            "module": pair["module"],
            "messages": [{"role": "user", "content": pair["question"]},
                         {"role": "assistant", "content": pair["answer"]}],
        })  # fmt: skip
    if not rows["train"] or not rows["test"]:
        raise ValueError(f"the instruction data has {len(rows['train'])} train and {len(rows['test'])} held-out "
                         f"pairs; use more modules or a larger val_fraction")  # fmt: skip
    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})


def load_chat_dataset(spec: str, val_fraction: float = 0.05, max_examples: int | None = None) -> datasets.DatasetDict:
    """`embedded` (the docstring Q&A), a local .json/.jsonl file or folder, or a Hub dataset name; rows must have
    `messages` (or `prompt` + `completion`, TRL's prompt-completion format). A source without a test split is
    split by `val_fraction`."""
    if spec == "embedded":
        return instruction_dataset(val_fraction, max_examples)
    path = Path(spec)
    if path.exists():
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.json*"))
        if not files:
            raise ValueError(f"--data {spec}: no .json or .jsonl files in the folder")
        loaded = datasets.load_dataset("json", data_files=files)
    else:
        loaded = datasets.load_dataset(spec)  # the Hub; offline this needs the dataset in the local cache
    columns = set(loaded[next(iter(loaded))].column_names)
    if "messages" not in columns and not {"prompt", "completion"} <= columns:
        raise ValueError(f"--data {spec}: rows need 'messages' or 'prompt' + 'completion'; found {sorted(columns)}")
    if "test" not in loaded:
        first = loaded[next(iter(loaded))]
        loaded = first.train_test_split(test_size=val_fraction, seed=0)
    if max_examples is not None:
        loaded["train"] = loaded["train"].select(range(min(max_examples, len(loaded["train"]))))
    return datasets.DatasetDict({"train": loaded["train"], "test": loaded["test"]})
