"""training/shards.py: a source tokenized into token shards on disk holds exactly the packed stream of
training/data.py (so pretraining on shards reads the blocks it read in memory), streaming gives the same shards,
blocks are read across file boundaries and mixed by weight, and bad shards fail with the reason."""

import json

import datasets
import numpy as np
import pytest
import torch

from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import topic_documents
from training import shards
from training.data import build_datasets
from training.shards import PackedBlocks, TokenStream, open_split, prepare, prepared_sources, read_meta

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [doc["text"] for doc in topic_documents()[:40]]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts[:20], vocab_size=400)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_shards_hold_the_packed_stream_with_byte_counts(tmp_path, tokenizer, texts):
    source = str(write_jsonl(tmp_path / "docs.jsonl", texts))
    folder = prepare(source, tokenizer, tmp_path / "shards", val_fraction=0.2, shard_tokens=1000)
    meta = read_meta(folder)
    assert meta["dtype"] == "uint16" and len(meta["splits"]["train"]["files"]) > 3  # several files of 1,000 ids
    train, validation = build_datasets(source, tokenizer, 64, val_fraction=0.2)  # the in-memory packing
    assert torch.equal(open_split([folder], "train", 64)[:], torch.tensor(train["input_ids"]))
    assert torch.equal(open_split([folder], "validation", 64)[:], torch.tensor(validation["input_ids"]))
    docs = [json.loads(line)["text"] for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    total_bytes = sum(meta["splits"][split]["bytes"] for split in ("train", "validation"))
    assert total_bytes == sum(len(t.encode("utf-8")) for t in docs)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == len(docs)
    assert (folder / "tokenizer" / "tokenizer.json").exists() and not (tmp_path / ".tmp-shards").exists()


def test_streaming_writes_the_same_shards_and_stops_at_max_tokens(tmp_path, tokenizer, texts):
    dataset = tmp_path / "ds"
    write_jsonl(dataset / "train.jsonl", texts)
    loaded = prepare(str(dataset), tokenizer, tmp_path / "loaded", val_fraction=0.2)
    streamed = prepare(str(dataset), tokenizer, tmp_path / "streamed", val_fraction=0.2, streaming=True)
    for split in ("train", "validation"):
        ours, theirs = TokenStream(streamed, split), TokenStream(loaded, split)
        assert len(ours) > 0 and np.array_equal(ours.read(0, len(ours)), theirs.read(0, len(theirs)))
    shards.BATCH_DOCUMENTS, batch = 4, shards.BATCH_DOCUMENTS
    try:
        capped = prepare(str(dataset), tokenizer, tmp_path / "capped", val_fraction=0.2, streaming=True, max_tokens=1)
    finally:
        shards.BATCH_DOCUMENTS = batch
    assert read_meta(capped)["splits"]["train"]["documents"] == 4  # stops after the first batch of documents


def test_blocks_read_across_files_and_mix_by_weight(tmp_path, tokenizer, texts):
    a = prepare(str(write_jsonl(tmp_path / "a.jsonl", texts[:30])), tokenizer, tmp_path / "a", shard_tokens=333)
    b = prepare(str(write_jsonl(tmp_path / "b.jsonl", texts[30:])), tokenizer, tmp_path / "b", shard_tokens=333)
    stream = TokenStream(a, "train")
    whole = np.concatenate(
        [np.fromfile(a / s["file"], dtype=np.uint16) for s in read_meta(a)["splits"]["train"]["files"]]
    )
    assert np.array_equal(stream.read(300, 100), whole[300:400])  # crosses from the first file into the second
    mixed = open_split([a, b], "train", 32, weights=[0.25, 0.75])
    counts = [len(TokenStream(folder, "train")) // 32 for folder in (a, b)]
    assert mixed.counts == counts and len(mixed) >= sum(counts)
    from_a = mixed.ends[0] / len(mixed)
    assert from_a == pytest.approx(0.25, abs=0.01)
    assert torch.equal(mixed[[0]], torch.from_numpy(whole[:32].astype(np.int64))[None])
    assert torch.equal(
        mixed[[mixed.ends[0]]], torch.from_numpy(TokenStream(b, "train").read(0, 32).astype(np.int64))[None]
    )
    every = mixed[range(len(mixed))]
    assert every.shape == (len(mixed), 32) and every.dtype == torch.long


def test_a_short_stream_repeats_to_fill_its_share():
    stream = type("Stream", (), {"__len__": lambda self: 64, "read": lambda self, s, n: np.arange(s, s + n)})()
    long_stream = type("Stream", (), {"__len__": lambda self: 640, "read": lambda self, s, n: -np.arange(s, s + n)})()
    blocks = PackedBlocks([stream, long_stream], 32, weights=[0.5, 0.5])  # 2 blocks vs 20: the first repeats
    assert blocks.ends == [20, 40]
    assert [int(blocks[[i]][0, 0]) for i in range(4)] == [0, 32, 0, 32]


def test_shards_of_another_tokenizer_are_refused(tmp_path, tokenizer, texts):
    folder = prepare(str(write_jsonl(tmp_path / "a.jsonl", texts)), tokenizer, tmp_path / "a")
    other = train_tokenizer(texts[20:], vocab_size=300)
    with pytest.raises(ValueError, match=r"written by another tokenizer \(400 tokens.*this run's \(300 tokens"):
        prepared_sources(str(folder), other, tmp_path / "work")
    assert prepared_sources(str(folder), tokenizer, tmp_path / "work") == [(folder, 1.0)]


def test_a_corpus_smaller_than_one_block_is_an_error(tmp_path, tokenizer, texts):
    folder = prepare(str(write_jsonl(tmp_path / "a.jsonl", texts[:3])), tokenizer, tmp_path / "a", val_fraction=0)
    with pytest.raises(ValueError, match=r"train split: the documents make \d+ tokens .* block_size=100000"):
        open_split([folder], "train", 100_000)


def test_raw_sources_are_prepared_once_into_the_work_folder(tmp_path, tokenizer, texts):
    source = str(write_jsonl(tmp_path / "a.jsonl", texts))
    [(folder, weight)] = prepared_sources(source, tokenizer, tmp_path / "work")
    assert folder.parent == tmp_path / "work" and weight == 1.0
    written = (folder / "shards.json").stat().st_mtime_ns
    assert prepared_sources(source, tokenizer, tmp_path / "work")[0][0] == folder
    assert (folder / "shards.json").stat().st_mtime_ns == written  # same source, split and tokenizer: reused


def test_cli_prepares_one_source(tmp_path, tokenizer, texts, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    source = str(write_jsonl(tmp_path / "a.jsonl", texts))
    meta = shards.main(["--data", source, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out")])
    assert meta["splits"]["train"]["tokens"] == len(TokenStream(tmp_path / "out", "train"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(tmp_path / "out")
    with pytest.raises(ValueError, match="names 2 sources: prepare one per folder"):
        shards.main(["--data", f"{source},embedded", "--tokenizer", str(tmp_path / "tok")])
