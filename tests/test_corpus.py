"""The embedded corpus: deterministic, sane sizes, a stable split, idempotent atomic writes."""

import json
import os
import sysconfig
from pathlib import Path

import pytest

from tiny_hf.corpus import (
    DEFAULT_MAX_BYTES,
    DOC_SEPARATOR,
    build_documents,
    iter_texts,
    main,
    split_documents,
    write_corpus,
)

SMALL_STDLIB = os.path.join(sysconfig.get_paths()["stdlib"], "json")  # a few modules: fast enough to build twice


def _size(docs: list[dict]) -> int:
    return sum(len(d["text"].encode()) for d in docs)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return build_documents()


def test_build_is_deterministic():
    first = build_documents(stdlib_dir=SMALL_STDLIB)
    assert first == build_documents(stdlib_dir=SMALL_STDLIB)
    assert {"stdlib/decoder", "stdlib/encoder", "topic/if"} <= {d["id"] for d in first}


def test_documents_are_sorted_unique_and_sane(docs):
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(set(d) == {"id", "source", "text"} and d["text"].strip() for d in docs)
    assert {d["source"] for d in docs} == {"pydoc_topics", "stdlib_docstrings"}
    assert 300 < len(docs) < 3000
    assert 1_000_000 < _size(docs) <= DEFAULT_MAX_BYTES
    assert not any(i.startswith(("stdlib/test.", "stdlib/idlelib")) or ".tests." in i for i in ids)


def test_docstring_document_layout(docs):
    text = next(d["text"] for d in docs if d["id"] == "stdlib/json")
    assert text.startswith("json\n\nJSON (JavaScript Object Notation)")
    assert "\njson.dumps(obj, *, skipkeys=False, ensure_ascii=True," in text
    encoder = next(d["text"] for d in docs if d["id"] == "stdlib/json.encoder")
    assert "\nclass json.encoder.JSONEncoder(object)\n" in encoder
    assert "\njson.encoder.JSONEncoder.encode(self, o)\n" in encoder  # methods are walked too


def test_max_bytes_caps_and_keeps_a_subset(docs):
    capped = build_documents(max_bytes=500_000, stdlib_dir=SMALL_STDLIB)
    assert 0 < _size(capped) <= 500_000
    full = build_documents(max_bytes=None, stdlib_dir=SMALL_STDLIB)
    assert {d["id"] for d in capped} <= {d["id"] for d in full}


def test_include_code_adds_sources_after_prose():
    both = build_documents(include_code=True, max_bytes=None, stdlib_dir=SMALL_STDLIB)
    assert "code/decoder" in {d["id"] for d in both}
    prose = build_documents(max_bytes=None, stdlib_dir=SMALL_STDLIB)
    capped = build_documents(include_code=True, max_bytes=_size(prose), stdlib_dir=SMALL_STDLIB)
    assert capped == prose  # the cap drops code before any prose


def test_split_is_disjoint_complete_and_stable(docs):
    train, val = split_documents(docs, val_fraction=0.05)
    train_ids, val_ids = {d["id"] for d in train}, {d["id"] for d in val}
    assert not train_ids & val_ids and len(train_ids | val_ids) == len(docs)
    assert 0.01 < len(val) / len(docs) < 0.12
    # The side depends on the id alone: order and the other documents do not matter.
    assert {d["id"] for d in split_documents(docs[::-1])[1]} == val_ids
    assert {d["id"] for d in split_documents(docs[::3])[1]} == val_ids & {d["id"] for d in docs[::3]}
    # A larger fraction only moves documents from train to validation.
    assert val_ids <= {d["id"] for d in split_documents(docs, val_fraction=0.2)[1]}


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_split_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match=f"val_fraction={bad} "):
        split_documents([], bad)


def test_write_corpus_is_idempotent_and_atomic(docs, tmp_path):
    meta = write_corpus(tmp_path, documents=docs)
    files = sorted(os.listdir(tmp_path))
    assert files == ["meta.json", "train.jsonl", "train.txt", "validation.jsonl", "validation.txt"]
    first = {f: (tmp_path / f).read_bytes() for f in files}
    assert write_corpus(tmp_path, documents=docs) == meta
    assert sorted(os.listdir(tmp_path)) == files  # no temp files left behind
    assert {f: (tmp_path / f).read_bytes() for f in files} == first

    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["train"]["documents"] + meta["validation"]["documents"] == len(docs)
    assert meta["train"]["bytes"] + meta["validation"]["bytes"] == _size(docs)
    train, _ = split_documents(docs)
    assert list(iter_texts(tmp_path / "train.jsonl")) == [d["text"] for d in train]
    assert (tmp_path / "train.txt").read_text(encoding="utf-8") == DOC_SEPARATOR.join(d["text"] for d in train) + "\n"


def test_cli(tmp_path):
    out = Path(tmp_path) / "corpus"
    meta = main(["--out", str(out), "--val-fraction", "0.1", "--max-bytes", "300000"])
    assert meta["val_fraction"] == 0.1 and (out / "validation.jsonl").exists()
    assert meta["train"]["bytes"] + meta["validation"]["bytes"] <= 300_000
