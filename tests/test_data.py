"""The pretraining data pipeline: data specs, document sources and splits, exact packing, mixing, length schedule."""

import json
from collections import Counter

import datasets
import pytest
import torch

from tiny_hf import TinyConfig
from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import DOC_SEPARATOR, topic_documents
from training.data import (
    EMBEDDED,
    SequenceLengthSchedule,
    build_datasets,
    load_documents,
    parse_data_spec,
    token_byte_lengths,
    tokenize_and_pack,
)

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [doc["text"] for doc in topic_documents()]  # 79 documents, ~470 KB


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts[:30], vocab_size=400)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes its arrow cache under HF_DATASETS_CACHE (read at call time): keep it out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def assert_disjoint_split(dd: datasets.DatasetDict, expected: list[str]):
    train, validation = list(dd["train"]["text"]), list(dd["validation"]["text"])
    assert dd["train"].column_names == dd["validation"].column_names == ["text"]
    assert train and validation and not set(train) & set(validation)
    assert Counter(train + validation) == Counter(expected)


# --- parse_data_spec ---------------------------------------------------------------------------------------------


def test_parse_data_spec_normalises_weights():
    (a, wa), (b, wb) = parse_data_spec("embedded:7,notes/:3")
    assert (a, b) == ("embedded", "notes/") and (wa, wb) == pytest.approx((0.7, 0.3))
    assert parse_data_spec("embedded") == [("embedded", 1.0)]
    assert parse_data_spec(" a:3 , b ") == [("a", 0.75), ("b", 0.25)]  # no weight counts 1 before normalising


def test_parse_data_spec_colons_and_slashes_in_names():
    spec = "user/name:config:2,data/a:b/,hf://x/y"
    assert parse_data_spec(spec) == [("user/name:config", 0.5), ("data/a:b/", 0.25), ("hf://x/y", 0.25)]


@pytest.mark.parametrize(
    "spec, bad",
    [
        ("", "''"),
        ("a:0", "a:0"),
        ("a:-1", "a:-1"),
        ("a:nan", "a:nan"),
        ("a:inf", "a:inf"),
        ("a,,b", "''"),
        (":0.5", ":0.5"),
        ("a:1,a:2", "'a' is listed twice"),
    ],
)
def test_parse_data_spec_rejects_bad_parts(spec, bad):
    with pytest.raises(ValueError, match=bad):
        parse_data_spec(spec)


# --- load_documents ----------------------------------------------------------------------------------------------


def test_txt_file_with_separators_is_several_documents(tmp_path, texts):
    path = tmp_path / "corpus.txt"
    path.write_text(DOC_SEPARATOR.join(texts[:20]) + "\n", encoding="utf-8")  # write_corpus's train.txt layout
    assert_disjoint_split(load_documents(str(path), val_fraction=0.2), texts[:20])


def test_txt_file_without_separator_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter 1.\n\n\nChapter 2.\n", encoding="utf-8")
    dd = load_documents(str(path), val_fraction=0.0)  # one document cannot be split: val_fraction=0 asks for none
    assert list(dd["train"]["text"]) == ["Chapter 1.\n\n\nChapter 2.\n"] and len(dd["validation"]) == 0
    with pytest.raises(ValueError, match="single distinct document.*val_fraction=0"):
        load_documents(str(path), val_fraction=0.05)


def test_jsonl_file_uses_the_text_column(tmp_path, texts):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts[:30])])
    assert_disjoint_split(load_documents(str(path), val_fraction=0.2, text_column="body"), texts[:30])


def test_folder_reads_document_files_recursively(tmp_path, texts):
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "notes" / "a.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "notes" / "sub" / "b.md").write_text(texts[1], encoding="utf-8")
    (tmp_path / "notes" / "c.json").write_text(json.dumps([{"text": texts[2]}, {"text": texts[3]}]))
    write_jsonl(tmp_path / "notes" / "sub" / "d.jsonl", [{"text": t} for t in texts[4:10]] + [{"text": "  "}])
    (tmp_path / "notes" / "skip.py").write_text("not a document")
    (tmp_path / "notes" / ".hidden").mkdir()
    (tmp_path / "notes" / ".hidden" / "e.txt").write_text("not a document either")
    # Few documents rarely fill a 5% validation split by hash: one moves across so both splits exist.
    assert_disjoint_split(load_documents(str(tmp_path / "notes")), texts[:10])  # the whitespace-only one dropped


def test_duplicate_documents_never_straddle_the_split(tmp_path, texts):
    path = write_jsonl(tmp_path / "dups.jsonl", [{"text": t} for t in texts[:20] * 3])
    dd = load_documents(str(path), val_fraction=0.3)
    assert not set(dd["train"]["text"]) & set(dd["validation"]["text"])
    assert len(dd["train"]) % 3 == 0 and len(dd["validation"]) % 3 == 0


def test_local_dataset_folder_goes_through_load_dataset(tmp_path, texts):
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", [{"content": t, "n": i} for i, t in enumerate(texts[:12])])
    write_jsonl(folder / "validation.jsonl", [{"content": t, "n": 0} for t in texts[12:15]])
    dd = load_documents(str(folder), text_column="content")
    assert list(dd["train"]["text"]) == texts[:12] and list(dd["validation"]["text"]) == texts[12:15]  # own split
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['content', 'n'\]"):
        load_documents(str(folder))


def test_dataset_without_validation_split_is_split_by_document(tmp_path, texts):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"text": t} for t in texts[:40]])
    assert_disjoint_split(load_documents(str(tmp_path / "ds"), val_fraction=0.2), texts[:40])
    datasets.Dataset.from_dict({"text": texts[:40], "x": list(range(40))}).save_to_disk(tmp_path / "saved")
    assert_disjoint_split(load_documents(str(tmp_path / "saved"), val_fraction=0.2), texts[:40])


def test_embedded_source_end_to_end(tmp_path):
    dd = load_documents(EMBEDDED, cache_dir=tmp_path)  # builds tmp_path/corpus (~2 s), reads it with load_dataset
    assert 500 < len(dd["train"]) and 10 < len(dd["validation"])
    assert not set(dd["train"]["text"]) & set(dd["validation"]["text"])
    meta = tmp_path / "corpus" / "meta.json"
    written = meta.stat().st_mtime_ns
    assert len(load_documents(EMBEDDED, cache_dir=tmp_path)["train"]) == len(dd["train"])
    assert meta.stat().st_mtime_ns == written  # same val_fraction: the corpus is reused, not rebuilt


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="'no/such/path' is neither a local file or folder.*load_dataset"):
        load_documents("no/such/path")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no documents with text"):
        load_documents(str(tmp_path / "empty.txt"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"record 2: no 'text' field; its fields are \['body', 'id'\]"):
        load_documents(str(bad))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no .txt/.md/.jsonl/.json file"):
        load_documents(str(tmp_path / "empty_dir"))
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="table.csv': no .txt/.md/.jsonl/.json file"):
        load_documents(str(tmp_path / "table.csv"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl: not JSON Lines"):
        load_documents(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        load_documents(str(bad), val_fraction=1.0)


# --- tokenize_and_pack -------------------------------------------------------------------------------------------


def stream_of(tokenizer, docs: list[str]) -> list[int]:
    ids = tokenizer(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [t for doc in ids for t in doc + [tokenizer.eos_token_id]]


def test_packing_is_the_exact_token_stream(tokenizer, texts):
    docs = texts[:25]
    blocks = tokenize_and_pack(datasets.Dataset.from_dict({"text": docs}), tokenizer, 64)
    stream = stream_of(tokenizer, docs)
    assert len(blocks) == len(stream) // 64  # the tail shorter than a block is dropped
    assert all(len(row) == 64 for row in blocks["input_ids"])
    assert [t for row in blocks["input_ids"] for t in row] == stream[: len(blocks) * 64]
    eos_positions = [i for i, t in enumerate(stream) if t == tokenizer.eos_token_id]
    assert len(eos_positions) == len(docs)  # one EOS after each document, nowhere else
    assert torch.tensor(blocks["input_ids"]).shape == (len(blocks), 64)


def test_packing_carries_tokens_across_map_batches(tokenizer, texts):
    docs = [f"note {i}: {texts[i % len(texts)][:80]}" for i in range(2500)]  # 3 map batches of 1000 documents
    blocks = tokenize_and_pack(datasets.Dataset.from_dict({"text": docs}), tokenizer, 48)
    stream = stream_of(tokenizer, docs)
    assert [t for row in blocks["input_ids"] for t in row] == stream[: len(stream) // 48 * 48]


def test_num_bytes_counts_the_text_bytes_exactly(tokenizer):
    docs = ["naïve café: 日本語のテキスト 🙂🙂", "plain ascii", "<|endoftext|> is text here, Ω≈ç√"] * 20
    blocks = tokenize_and_pack(datasets.Dataset.from_dict({"text": docs}), tokenizer, 16)
    stream, table = stream_of(tokenizer, docs), token_byte_lengths(tokenizer)
    assert sum(table[t] for t in stream) == sum(len(d.encode("utf-8")) for d in docs)  # multibyte chars split
    assert list(blocks["num_bytes"]) == [sum(table[t] for t in row) for row in blocks["input_ids"]]
    for row, num_bytes in zip(blocks["input_ids"], blocks["num_bytes"], strict=True):
        text = tokenizer.decode(row, skip_special_tokens=True)
        if "\ufffd" not in text:  # the block does not cut a character in two
            assert len(text.encode("utf-8")) == num_bytes
    assert stream.count(tokenizer.eos_token_id) == len(docs)  # a literal "<|endoftext|>" is not an EOS


def test_token_byte_lengths(tokenizer):
    table = token_byte_lengths(tokenizer)
    assert len(table) == len(tokenizer)
    assert all(table[i] == 0 for i in tokenizer.all_special_ids)
    assert min(table[i] for i in range(len(table)) if i not in tokenizer.all_special_ids) == 1


def test_too_short_corpus_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"make \d+ tokens .* fewer than one block of block_size=4096"):
        tokenize_and_pack(datasets.Dataset.from_dict({"text": ["short", "docs"]}), tokenizer, 4096)


# --- build_datasets ----------------------------------------------------------------------------------------------


def test_mixture_follows_the_weights(tmp_path, tokenizer, texts):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:30]])
    b = write_jsonl(tmp_path / "b" / "b.jsonl", [{"text": t} for t in texts[30:60]])
    train, validation = build_datasets(f"{a}:0.75,{b.parent}/:0.25", tokenizer, 64, val_fraction=0.2)
    sources = Counter(train["source"])
    assert sum(sources.values()) > 500
    assert sources[str(a)] / len(train) == pytest.approx(0.75, abs=0.05)
    assert set(validation["source"]) == {str(a), f"{b.parent}/"}
    assert train.column_names == ["input_ids", "num_bytes", "source"]
    assert not {tuple(row) for row in train["input_ids"]} & {tuple(row) for row in validation["input_ids"]}


def test_single_source_and_empty_validation(tmp_path, tokenizer, texts):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:10]])
    train, validation = build_datasets(str(a), tokenizer, 32, val_fraction=0.0)
    assert set(train["source"]) == {str(a)} and len(validation) == 0
    assert validation.column_names == ["input_ids", "num_bytes", "source"]
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", [{"text": t} for t in texts[:10]])
    write_jsonl(folder / "validation.jsonl", [{"text": "too short for a block"}])
    with pytest.raises(ValueError, match="validation split: the documents make .*raise val_fraction"):
        build_datasets(str(folder), tokenizer, 32)


# --- SequenceLengthSchedule --------------------------------------------------------------------------------------


def test_schedule_phases_and_boundaries():
    schedule = SequenceLengthSchedule("128:0.25,256:0.25,512")
    assert schedule.max_length == 512
    lengths = [schedule.length_at(step, 100) for step in (0, 24, 25, 49, 50, 99, 150)]
    assert lengths == [128, 128, 256, 256, 512, 512, 512]
    assert SequenceLengthSchedule("512").length_at(0, 10) == 512
    tricky = SequenceLengthSchedule("64:0.1,128:0.2,256")  # 0.1 + 0.2 is not 0.3 in floating point
    assert [tricky.length_at(s, 10) for s in (0, 1, 2, 3)] == [64, 128, 128, 256]
    assert SequenceLengthSchedule("512:0.5,128").max_length == 512  # lengths need not increase


def test_reshape_keeps_tokens_and_order():
    blocks = torch.arange(2 * 512).reshape(2, 512)
    rows = SequenceLengthSchedule.reshape(blocks, 128)
    assert rows.shape == (8, 128) and torch.equal(rows.flatten(), blocks.flatten())
    with pytest.raises(ValueError, match="does not divide"):
        SequenceLengthSchedule.reshape(blocks, 100)


@pytest.mark.parametrize(
    "spec, bad",
    [
        ("0", "'0' must be positive"),
        ("128:0.5,-256", "'-256' must be positive"),
        ("128,512", "'128' needs a fraction"),
        ("128:1.5,512", "'128:1.5' needs a fraction"),
        ("128:0.5,512:0.5", "last phase '512:0.5'"),
        ("128:0.6,256:0.5,512", "sum to 1.1"),
        ("96:0.5,256", r"\[96\] do not divide the longest length 256"),
        ("abc", "'abc' is not"),
    ],
)
def test_schedule_rejects_bad_specs(spec, bad):
    with pytest.raises(ValueError, match=bad):
        SequenceLengthSchedule(spec)


def test_check_positions():
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    learned = TinyConfig(position_embedding="learned", max_position_embeddings=128, **fields)
    SequenceLengthSchedule("64:0.5,128").check_positions(learned)
    with pytest.raises(ValueError, match="256 exceeds max_position_embeddings=128"):
        SequenceLengthSchedule("256").check_positions(learned)
    rope = TinyConfig(position_embedding="rope", max_position_embeddings=128, **fields)
    SequenceLengthSchedule("256").check_positions(rope)  # rope computes positions: no table to run past
