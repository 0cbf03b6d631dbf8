"""Token shards: a data source tokenized once into flat uint16/uint32 files on disk, read back memory-mapped.

    tiny-hf data --data notes/ --tokenizer runs/tokenizer --out data/notes
    tiny-hf data --data HuggingFaceFW/fineweb-edu:sample-10BT --streaming --max-tokens 1000000000 \\
        --tokenizer runs/tokenizer --out data/fineweb-edu
    tiny-hf pretrain --data data/fineweb-edu:0.9,data/notes:0.1 --out runs/fw

A prepared folder holds each split's token stream (every document's ids, then an end-of-text id, the stream
`training.data.tokenize_and_pack` packs) in files of at most `--shard-tokens` ids, `shards.json` (token, document
and byte counts, the dtype, and a fingerprint of the tokenizer) and the tokenizer itself. Training cuts the stream
into blocks of its own `--block-size` and reads only the blocks of each step (`PackedBlocks`), so the corpus can be
far larger than RAM; pretraining prepares any raw source of its `--data` this way itself, into `<out>/data`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from tiny_hf.corpus import stable_fraction
from training.data import encode_documents, load_documents, parse_data_spec, tokenize_and_pack

META_FILE = "shards.json"  # written last: a folder without it is not a prepared source
SPLITS = ("train", "validation")
SHARD_TOKENS = 100_000_000  # ids per file (200 MB as uint16), as nanoGPT's FineWeb shards
BATCH_DOCUMENTS = 1000  # documents tokenized per call (the fast tokenizer batches them across threads)


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a folder written by `prepare` (it has shards.json)."""
    return (Path(path) / META_FILE).is_file()


def tokenizer_fingerprint(tokenizer) -> dict:
    """The vocabulary size and a sha256 of the token -> id map: shards are valid only for the tokenizer that wrote
    them, and ids from another one would train on garbage (or index past the embedding table)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"vocab_size": len(tokenizer), "sha256": hashlib.sha256(vocab.encode()).hexdigest()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (2 bytes per token), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# --- writing ---------------------------------------------------------------------------------------------------------
def _documents(source: str, *, val_fraction: float, cache_dir: Path, text_column: str, streaming: bool):
    """(split, text) pairs of a source. Loaded (`load_documents`), or streamed from `datasets.load_dataset(...,
    streaming=True)` one document at a time, its own validation split kept, else split by a hash of the text as
    `load_documents` does (`tiny_hf.corpus.stable_fraction`), so the same document always lands on the same side."""
    if not streaming:
        docs = load_documents(source, val_fraction=val_fraction, cache_dir=cache_dir, text_column=text_column)
        for split in SPLITS:
            yield from ((split, text) for text in docs[split]["text"])
        return
    name, config = source, None
    if not Path(source).exists() and ":" in source and "://" not in source:
        name, config = source.split(":", 1)  # a Hub "namespace/name:config"
    try:
        loaded = datasets.load_dataset(name, config, streaming=True)
    except Exception as error:
        raise FileNotFoundError(
            f"data source {source!r} could not be streamed: {type(error).__name__}: {error}"
        ) from error
    if "train" not in loaded:
        raise ValueError(f"data source {source!r}: no 'train' split; its splits are {list(loaded)}")
    held_out = next((split for split in ("validation", "test") if split in loaded), None)
    for split_name in filter(None, ("train", held_out)):
        for record in loaded[split_name]:
            if text_column not in record:
                raise ValueError(
                    f"data source {source!r}: no column {text_column!r}; its columns are {sorted(record)}"
                )
            text = record[text_column]
            if not isinstance(text, str) or not text.strip():
                continue
            if held_out is not None:
                yield ("validation" if split_name == held_out else "train"), text
            else:
                yield ("validation" if stable_fraction(text) < val_fraction else "train"), text


class _SplitWriter:
    """Appends token ids to one split's files, starting a new file every `shard_tokens` ids."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[dict] = []  # {"file", "tokens"} per shard
        self.documents = self.bytes = 0
        self.handle = None

    @property
    def tokens(self) -> int:
        return sum(shard["tokens"] for shard in self.files)

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.handle is None or self.files[-1]["tokens"] == self.shard_tokens:
                self.close()
                name = f"{self.split}-{len(self.files):05d}.bin"
                self.files.append({"file": name, "tokens": 0})
                self.handle = open(self.folder / name, "wb")
            take = min(len(ids), self.shard_tokens - self.files[-1]["tokens"])
            ids[:take].tofile(self.handle)
            self.files[-1]["tokens"] += take
            ids = ids[take:]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def prepare(
    source: str,
    tokenizer,
    out: str | Path,
    *,
    val_fraction: float = 0.05,
    cache_dir: str | Path = "data",
    text_column: str = "text",
    streaming: bool = False,
    max_tokens: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = False,
) -> Path:
    """Tokenize one source into token shards in `out` (written into a temporary folder, renamed when complete).

    Args:
        source: "embedded", a local file or folder, or a dataset name (`training.data.load_documents`).
        tokenizer: a transformers tokenizer with an `eos_token_id`; saved into `out/tokenizer`.
        val_fraction: held-out share of documents, for sources without their own validation split.
        cache_dir: where the embedded corpus is cached.
        text_column: the field holding the text.
        streaming: read the source one document at a time (`datasets` streaming), never holding it in memory.
        max_tokens: stop once the train split has this many ids (the validation split keeps its share).
        shard_tokens: ids per file.
        progress: show a progress bar of documents.
    """
    out = Path(out)
    dtype = token_dtype(len(tokenizer))
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = {split: _SplitWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}

    def flush(split: str) -> None:
        texts, writer = pending[split], writers[split]
        if texts:
            writer.write(np.fromiter((t for ids in encode_documents(texts, tokenizer) for t in ids), dtype=dtype))
            writer.documents += len(texts)
            writer.bytes += sum(len(text.encode("utf-8")) for text in texts)
            texts.clear()

    documents = _documents(
        source, val_fraction=val_fraction, cache_dir=Path(cache_dir), text_column=text_column, streaming=streaming
    )
    try:
        for split, text in tqdm(documents, desc=f"tokenize {source}", unit="doc", disable=not progress):
            pending[split].append(text)
            if len(pending[split]) == BATCH_DOCUMENTS:
                flush(split)
                if max_tokens is not None and writers["train"].tokens >= max_tokens:
                    break
        for split in SPLITS:
            flush(split)
    finally:
        for writer in writers.values():
            writer.close()
    tokenizer.save_pretrained(tmp / "tokenizer")
    meta = {
        "source": source,
        "val_fraction": val_fraction,
        "text_column": text_column,
        "dtype": dtype.name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "splits": {
            split: {"files": w.files, "tokens": w.tokens, "documents": w.documents, "bytes": w.bytes}
            for split, w in writers.items()
        },
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def read_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / META_FILE).read_text())


# --- reading ---------------------------------------------------------------------------------------------------------
class TokenStream:
    """One split of a prepared folder as one read-only sequence of token ids: its files memory-mapped, so reading a
    block touches only that block's pages."""

    def __init__(self, folder: str | Path, split: str):
        meta = read_meta(folder)
        shards = meta["splits"][split]["files"]
        self.name = f"{meta['source']} ({split})"
        self.files = [np.memmap(Path(folder) / s["file"], dtype=meta["dtype"], mode="r") for s in shards]
        self.starts = [0]  # where each file begins in the stream
        for data in self.files:
            self.starts.append(self.starts[-1] + len(data))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """ids [start, start + length), gathered across file boundaries."""
        parts, end = [], start + length
        if start < 0 or end > len(self):
            raise IndexError(f"ids [{start}, {end}) are outside {self.name}, which has {len(self)}")
        i = bisect.bisect_right(self.starts, start) - 1
        while start < end:
            offset = start - self.starts[i]
            take = min(end - start, len(self.files[i]) - offset)
            parts.append(self.files[i][offset : offset + take])
            start += take
            i += 1
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])


class PackedBlocks:
    """Fixed-length blocks cut from token streams, mixed by weight, read from disk only when indexed.

    Block j of a stream is ids [j * block_size, (j + 1) * block_size) (the tail shorter than a block is dropped, as
    `tokenize_and_pack` drops it). Several streams share one index space of `len(self)` slots: stream i gets about
    weight_i of the slots and at least one per block (every block is used once a pass, a stream short for its weight
    is repeated), so a uniform sample of slots follows the weights. `blocks[indices]` is a (n, block_size) LongTensor.

    Args:
        streams: the token streams.
        block_size: ids per block.
        weights: each stream's share (default: the streams concatenated, each block once, as validation is).
    """

    def __init__(self, streams: list[TokenStream], block_size: int, weights: list[float] | None = None):
        self.streams, self.block_size = streams, block_size
        self.counts = [len(stream) // block_size for stream in streams]
        if weights is None:
            slots = self.counts
        else:
            total = max(count / weight for count, weight in zip(self.counts, weights, strict=True) if count)
            slots = [
                max(count, round(total * weight)) if count else 0
                for count, weight in zip(self.counts, weights, strict=True)
            ]
        self.ends = np.cumsum(slots).tolist()  # where each stream's slots end

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, indices) -> torch.Tensor:
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        rows = []
        for index in indices:
            i = bisect.bisect_right(self.ends, index)
            j = (index - (self.ends[i - 1] if i else 0)) % self.counts[i]
            rows.append(self.streams[i].read(j * self.block_size, self.block_size).astype(np.int64))
        if not rows:
            return torch.empty(0, self.block_size, dtype=torch.long)
        return torch.from_numpy(np.stack(rows))  # (n, block_size)


def open_split(folders: list[Path], split: str, block_size: int, weights: list[float] | None = None) -> PackedBlocks:
    """The `split` blocks of prepared folders; a train split with fewer ids than one block is an error, and so is a
    validation split that has documents but not one block."""
    streams = [TokenStream(folder, split) for folder in folders]
    for folder, stream in zip(folders, streams, strict=True):
        counts = read_meta(folder)["splits"][split]
        if len(stream) < block_size and (split == "train" or counts["documents"]):
            hint = ": raise --val-fraction or lower --block-size" if split == "validation" else ""
            raise ValueError(
                f"data source {read_meta(folder)['source']!r}, {split} split: the documents make {len(stream)} "
                f"tokens (one EOS per document included), fewer than one block of block_size={block_size}{hint}"
            )
    return PackedBlocks(streams, block_size, weights)


def check_tokenizer(folder: Path, tokenizer) -> None:
    """Refuse shards written by a tokenizer other than the run's, naming both vocabularies."""
    theirs, ours = read_meta(folder)["tokenizer"], tokenizer_fingerprint(tokenizer)
    if theirs != ours:
        raise ValueError(
            f"token shards {folder} were written by another tokenizer ({theirs['vocab_size']} tokens, vocabulary "
            f"sha256 {theirs['sha256'][:12]}) than this run's ({ours['vocab_size']} tokens, {ours['sha256'][:12]}): "
            f"train with --tokenizer {folder / 'tokenizer'}, or prepare the shards again with this tokenizer"
        )


def prepared_sources(
    spec: str,
    tokenizer,
    work_dir: Path,
    *,
    val_fraction: float = 0.05,
    cache_dir: str | Path = "data",
) -> list[tuple[Path, float]]:
    """The prepared folder and weight of every source of a data spec: a prepared folder is used as it is (if its
    tokenizer is this one); a raw source is tokenized into `work_dir/<n>-<name>`, or reused from there when that
    was written from the same source, split and tokenizer."""
    folders = []
    for number, (source, weight) in enumerate(parse_data_spec(spec)):
        if is_prepared(source):
            check_tokenizer(Path(source), tokenizer)
            folders.append((Path(source), weight))
            continue
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).name or source)[:60]
        folder = Path(work_dir) / f"{number}-{name}"
        wanted = {"source": source, "val_fraction": val_fraction, "tokenizer": tokenizer_fingerprint(tokenizer)}
        if not is_prepared(folder) or any(read_meta(folder).get(k) != v for k, v in wanted.items()):
            prepare(source, tokenizer, folder, val_fraction=val_fraction, cache_dir=cache_dir)
        folders.append((folder, weight))
    return folders


def shard_tokenizer(spec: str) -> str | None:
    """The tokenizer folder of the first prepared source of a data spec (what its ids mean), or None."""
    for source, _ in parse_data_spec(spec):
        if is_prepared(source):
            return str(Path(source) / "tokenizer")
    return None


def validation_blocks(spec: str, tokenizer, block_size: int, **prepare_args) -> torch.Tensor:
    """Every source's validation blocks, concatenated (what pretraining evaluates on), as one (N, block_size) tensor:
    prepared folders are read, raw sources tokenized in memory (validation is small)."""
    parts = []
    for source, _ in parse_data_spec(spec):
        if is_prepared(source):
            check_tokenizer(Path(source), tokenizer)
            parts.append(open_split([Path(source)], "validation", block_size)[:])
        else:
            docs = load_documents(source, **prepare_args)["validation"]
            if len(docs):
                parts.append(torch.tensor(tokenize_and_pack(docs, tokenizer, block_size)["input_ids"]))
    return torch.cat(parts) if parts else torch.empty(0, block_size, dtype=torch.long)


# --- the command -----------------------------------------------------------------------------------------------------
@dataclass
class DataOptions:
    data: str = field(default="embedded", metadata={"help": "one source: 'embedded', a file or folder, a dataset"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer folder or Hub id (tiny-hf tokenizer makes one)"})
    out: Path = field(default=Path("data/shards"), metadata={"help": "the folder to write"})
    streaming: bool = field(default=False, metadata={"help": "stream a large dataset instead of loading it"})
    max_tokens: int | None = field(default=None, metadata={"help": "stop after this many training tokens"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out share, for sources without a split"})
    text_column: str = "text"
    shard_tokens: int = field(default=SHARD_TOKENS, metadata={"help": "token ids per shard file"})
    cache_dir: Path = field(default=Path("data"), metadata={"help": "where the embedded corpus is cached"})


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from tiny_hf.options import parse_options

    (options,) = parse_options(DataOptions, argv=argv, description=__doc__)
    sources = parse_data_spec(options.data)
    if len(sources) > 1:
        raise ValueError(
            f"--data {options.data!r} names {len(sources)} sources: prepare one per folder, then mix "
            "the folders by weight in pretrain's --data"
        )
    if not options.tokenizer:
        raise ValueError("--tokenizer is required: the shards hold its ids (`tiny-hf tokenizer` trains one)")
    for name in ("max_tokens", "shard_tokens"):
        if (value := getattr(options, name)) is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be at least 1")
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
    folder = prepare(
        sources[0][0],
        tokenizer,
        options.out,
        val_fraction=options.val_fraction,
        cache_dir=options.cache_dir,
        text_column=options.text_column,
        streaming=options.streaming,
        max_tokens=options.max_tokens,
        shard_tokens=options.shard_tokens,
        progress=True,
    )
    meta = read_meta(folder)
    print(json.dumps({"out": str(folder), **meta["splits"]["train"], "files": len(meta["splits"]["train"]["files"])}))
    return meta


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
