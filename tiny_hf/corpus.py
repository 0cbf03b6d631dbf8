"""The embedded default corpus: English prose that ships with every Python install, so nothing is downloaded.

Two sources: the pydoc help topics (`pydoc_data.topics`, the language reference in prose) and the docstrings of the
standard library, read with `ast` from the source files (never imported: importing runs code and is slow). With
Python 3.11 this gives about 2.5 MB of text in ~670 documents, enough to train an 8k BPE vocabulary and a tiny
language model on CPU. The text depends on the Python version, which `meta.json` records.

CLI: `tiny-hf corpus --out data/corpus [--include-code] [--val-fraction 0.05]`.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import json
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .system import write_atomic

# Folders of the standard library that hold tests, an IDE or third-party packages rather than library docs.
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}  # lib2to3/tests goes with "tests"
# About 2.5 MB of prose exists (Python 3.11); the cap only bites with --include-code or a much larger stdlib, and
# keeps a tiny-model run on CPU short. Pass max_bytes=None for everything.
DEFAULT_MAX_BYTES = 4_000_000
# Separates documents in train.txt / validation.txt: the GPT-2 convention, and our tokenizer's end-of-text token.
DOC_SEPARATOR = "\n<|endoftext|>\n"


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone: the one way the project samples and splits by hash (held-out
    documents, subsets), the same in every process (Python's hash() is salted per process, so it cannot be used)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Parsing allocates millions of (acyclic) AST nodes, and each allocation burst triggers a cyclic-GC pass over every
    # object alive in the process; with torch and transformers imported that made the build 2.4x slower.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def topic_documents() -> list[dict]:
    """One document per pydoc help topic (the language reference, ~470 KB): the fast corpus slice tests use."""
    from pydoc_data.topics import topics

    return [{"id": f"topic/{name}", "source": "pydoc_topics", "text": text.strip()} for name, text in topics.items()]


def _docstring_text(module: str, tree: ast.Module) -> str:
    """The module docstring, then `name(args)` and the docstring of every class, method and function."""
    parts = [module]
    if doc := ast.get_docstring(tree):  # clean=True applies inspect.cleandoc
        parts.append(doc)

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                heading = f"{prefix}{node.name}({ast.unparse(node.args)})"
            elif isinstance(node, ast.ClassDef):
                bases = ", ".join(ast.unparse(b) for b in node.bases)
                heading = f"class {prefix}{node.name}" + (f"({bases})" if bases else "")
                visit(node.body, f"{prefix}{node.name}.")  # methods and nested classes
            else:
                continue
            if doc := ast.get_docstring(node):
                parts.append(f"{heading}\n{doc}")

    visit(tree.body, f"{module}.")
    return "\n\n".join(parts) if len(parts) > 1 else ""


def stdlib_documents(stdlib_dir: str | None = None, include_code: bool = False) -> list[dict]:
    """One docstring document per standard-library module (and its source when include_code)."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        paths += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    docs = []
    with _gc_paused():
        for path in paths:
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            try:
                with tokenize.open(path) as f:  # honours PEP 263 coding cookies
                    source = f.read()
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are deliberately broken or written for another Python
            if text := _docstring_text(module, tree):
                docs.append({"id": f"stdlib/{module}", "source": "stdlib_docstrings", "text": text})
            if include_code:
                docs.append({"id": f"code/{module}", "source": "stdlib_code", "text": source})
    return docs


def build_documents(
    include_code: bool = False, max_bytes: int | None = DEFAULT_MAX_BYTES, stdlib_dir: str | None = None
) -> list[dict]:
    """Build the corpus: `{"id", "source", "text"}` documents sorted by id.

    Args:
        include_code: also add the raw source of every module, as separate `code/...` documents.
        max_bytes: keep documents (prose before code, then in stable-hash order, so the kept set is a fixed
            pseudo-random sample) until their UTF-8 size reaches this; None keeps everything.
        stdlib_dir: read this folder instead of the running interpreter's standard library (tests use a subfolder).
    """
    docs = topic_documents() + stdlib_documents(stdlib_dir, include_code)
    if max_bytes is not None:
        kept, total = [], 0
        for doc in sorted(docs, key=lambda d: (d["source"] == "stdlib_code", stable_fraction(d["id"]))):
            size = len(doc["text"].encode())
            if total + size <= max_bytes:
                kept.append(doc)
                total += size
        docs = kept
    return sorted(docs, key=lambda d: d["id"])


def split_documents(docs: list[dict], val_fraction: float = 0.05) -> tuple[list[dict], list[dict]]:
    """Split by document into (train, validation); the side depends on the id alone, so it never moves."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not in [0, 1)")
    train = [d for d in docs if stable_fraction(d["id"]) >= val_fraction]
    validation = [d for d in docs if stable_fraction(d["id"]) < val_fraction]
    return train, validation


def write_corpus(
    out_dir: str | os.PathLike,
    include_code: bool = False,
    val_fraction: float = 0.05,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    documents: list[dict] | None = None,
) -> dict:
    """Write train/validation as `.jsonl` (one document per line) and `.txt` (documents joined by
    `DOC_SEPARATOR`, a line `<|endoftext|>`), plus `meta.json`; return the meta.

    Same inputs give byte-identical files (no timestamps), so re-running is a no-op.

    Args:
        out_dir: folder to write; created if missing.
        include_code: see `build_documents`.
        val_fraction: share of documents in the validation split.
        max_bytes: see `build_documents`.
        documents: write these instead of building them (saves the ~5 s build when the caller has them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = documents if documents is not None else build_documents(include_code, max_bytes)
    splits = dict(zip(("train", "validation"), split_documents(docs, val_fraction), strict=True))
    meta = {"python": sys.version.split()[0], "include_code": include_code, "val_fraction": val_fraction}
    for name, split in splits.items():
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in split)
        write_atomic(out / f"{name}.jsonl", lines)
        write_atomic(out / f"{name}.txt", DOC_SEPARATOR.join(d["text"] for d in split) + "\n")
        meta[name] = {"documents": len(split), "bytes": sum(len(d["text"].encode()) for d in split)}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def iter_texts(path: str | os.PathLike) -> Iterator[str]:
    """Yield the `text` of each document of a `.jsonl` split file written by `write_corpus`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


@dataclass
class CorpusOptions:
    out: str = field(default="data/corpus", metadata={"help": "folder for train/validation .jsonl/.txt + meta.json"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out"})
    include_code: bool = field(default=False, metadata={"help": "also add the raw source of each module"})
    max_bytes: int = field(default=DEFAULT_MAX_BYTES, metadata={"help": "cap on the total text size; 0 for no cap"})


def main(argv: list[str] | None = None) -> dict:
    from .options import parse_options

    (options,) = parse_options(CorpusOptions, argv=argv, description=__doc__.split("\n\n")[0])
    if options.max_bytes < 0:
        raise ValueError(f"--max-bytes={options.max_bytes} must be 0 (no cap) or more")
    if not 0 <= options.val_fraction < 1:
        raise ValueError(f"--val-fraction={options.val_fraction} must be in [0, 1)")
    meta = write_corpus(options.out, options.include_code, options.val_fraction, options.max_bytes or None)
    print(json.dumps(meta, indent=2))
    return meta


if __name__ == "__main__":
    from .cli import run_main

    run_main(main)
