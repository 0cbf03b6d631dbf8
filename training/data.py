"""The pretraining data pipeline: sources -> documents -> packed token blocks, and a curriculum over sequence length.

A data spec names sources with mixing weights ("embedded:0.7,notes/:0.3"). Each source becomes documents split
train/validation by document (`load_documents`); a split's documents become one token stream with an end-of-text id
after each document, cut into fixed-length blocks (`tokenize_and_pack`); the sources' train blocks are interleaved
so each source's share of blocks follows its weight (`build_datasets`).

Pretraining writes the same token stream to shards on disk and reads its blocks from there (training/shards.py); the
stages that need a run's blocks in memory (fine-tuning, pruning, long context) pack them here. Everything is held in
memory, so no `datasets` cache is ever read back: `.map` would reuse one even when the arguments behind it changed.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path

import datasets
import torch

from tiny_hf.bpe import bytes_to_unicode
from tiny_hf.corpus import DOC_SEPARATOR, split_documents, write_corpus
from training.synthetic import SYNTHETIC_SOURCES, synthetic_texts

EMBEDDED = "embedded"  # the spec name of the embedded corpus (tiny_hf.corpus)
DOCUMENT_SUFFIXES = (".txt", ".md", ".jsonl", ".json")  # what a folder of documents is read for
# A folder holding split-named data files (train.jsonl, data/validation-0000.parquet, ...) is a dataset with its own
# splits, loaded by `datasets`, rather than a folder of documents (write_corpus's output is one).
_SPLIT_FILE = re.compile(r"(train|validation|valid|dev|test)([-_.].*)?\.(jsonl?|csv|parquet|arrow)")
_SAVED_TO_DISK = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes


def parse_data_spec(spec: str) -> list[tuple[str, float]]:
    """Parse 'embedded:0.7,notes/:0.3' into [('embedded', 0.7), ('notes/', 0.3)], the weights normalised to sum 1.

    A source without ':weight' weighs 1 before normalising. Names may contain ':' (a Hub 'user/name:config' or a URL):
    only a last ':' followed by a number is a weight.

    Args:
        spec: comma-separated sources, each optionally followed by ':weight'.
    """
    sources: list[tuple[str, float]] = []
    for part in spec.split(","):
        source, weight = part.strip(), 1.0
        head, sep, tail = source.rpartition(":")
        if sep:
            try:
                source, weight = head.strip(), float(tail)
            except ValueError:
                pass  # not a number: the ':' belongs to the name
        if not source:
            raise ValueError(f"data spec {spec!r}: part {part!r} names no source")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"data spec {spec!r}: the weight in {part.strip()!r} must be a positive number")
        if source in dict(sources):
            raise ValueError(f"data spec {spec!r}: {source!r} is listed twice; give it one weight")
        sources.append((source, weight))
    total = sum(weight for _, weight in sources)
    return [(source, weight / total) for source, weight in sources]


def load_documents(
    source: str, *, val_fraction: float = 0.05, cache_dir: str | Path = "data", text_column: str = "text"
) -> datasets.DatasetDict:
    """Load one source as `DatasetDict(train=..., validation=...)`, one document per row in a single column "text".

    - "embedded": the embedded corpus, written to `cache_dir/corpus` unless already there with this val_fraction and
      Python, read with `load_dataset("json")`; it is split by document id already.
    - "passkey", "key-value": synthetic retrieval documents (training/synthetic.py), generated with their own fixed
      train and validation seeds (val_fraction does not apply).
    - a file: `.txt` is one document, or several separated by `<|endoftext|>` lines (`DOC_SEPARATOR`, write_corpus's
      .txt layout); `.md` is one document; `.jsonl`/`.json` (JSON Lines or one list) a `text_column` per record.
    - a folder: every such file under it (recursive, sorted, hidden paths skipped). A folder of split-named data
      files (train.jsonl, ...) or written by `save_to_disk` is a dataset instead:
    - anything else: `datasets.load_dataset(source)`, a Hub name or a local dataset folder; its "validation" (else
      "test") split is the validation split.

    Sources without a validation split are split with `tiny_hf.corpus.split_documents`, the text as the document's
    id: a document never changes sides and duplicates share a side, so validation never shares a text with train.
    If every document hashes to one side, the last one (and its duplicates) moves across; a single distinct document
    cannot be split: an error, unless val_fraction=0 (empty validation). Empty documents are dropped.

    Args:
        source: "embedded", a path, or a dataset name.
        val_fraction: share of documents held out, for sources without their own validation split.
        cache_dir: where the embedded corpus and its `datasets` cache are written.
        text_column: the field holding the text in JSON records and datasets.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not in [0, 1)")
    path = Path(source)
    if (path / "shards.json").is_file():
        raise ValueError(
            f"data source {source!r} holds token shards (training/shards.py), not documents: this step needs the "
            "documents, so give the source the shards were prepared from"
        )
    if source == EMBEDDED:
        train, validation = _embedded_texts(Path(cache_dir), val_fraction)
    elif source in SYNTHETIC_SOURCES:
        train, validation = synthetic_texts(source)
        validation = validation if val_fraction > 0 else []
    elif path.is_file() or (path.is_dir() and not _is_dataset_folder(path)):
        files = [path] if path.is_file() else _document_files(path)
        if not files or files[0].suffix not in DOCUMENT_SUFFIXES:
            raise ValueError(f"data source {source!r}: no {'/'.join(DOCUMENT_SUFFIXES)} file (folders are searched)")
        texts = [text for file in files for text in _read_documents(file, text_column)]
        train, validation = _split_texts(texts, val_fraction, source)
    else:
        train, validation = _dataset_texts(source, val_fraction, text_column)
    return datasets.DatasetDict(train=_text_dataset(train), validation=_text_dataset(validation))


def training_texts(spec: str, val_fraction: float = 0.05, cache_dir: str | Path = "data") -> list[str]:
    """The training split's texts of every source in a data spec (held-out documents stay out): what a tokenizer
    is trained on."""
    return [
        doc["text"]
        for source, _ in parse_data_spec(spec)
        for doc in load_documents(source, val_fraction=val_fraction, cache_dir=cache_dir)["train"]
    ]


def _embedded_texts(cache_dir: Path, val_fraction: float) -> tuple[list[str], list[str]]:
    folder = cache_dir / "corpus"
    wanted = {"python": sys.version.split()[0], "include_code": False, "val_fraction": val_fraction}
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
    if any(meta.get(key) != value for key, value in wanted.items()):
        write_corpus(folder, val_fraction=val_fraction)  # ~2 s; meta.json is written last, so it marks a full corpus
    files = {split: str(folder / f"{split}.jsonl") for split in ("train", "validation")}
    loaded = datasets.load_dataset("json", data_files=files, cache_dir=str(cache_dir / "hf_datasets"))
    return list(loaded["train"]["text"]), list(loaded["validation"]["text"])


def _is_dataset_folder(folder: Path) -> bool:
    if any((folder / name).exists() for name in _SAVED_TO_DISK):
        return True
    data = folder / "data"  # the Hub layout: data/train-00000-of-00001.parquet
    files = [*folder.iterdir(), *(data.iterdir() if data.is_dir() else [])]
    return any(file.is_file() and _SPLIT_FILE.fullmatch(file.name) for file in files)


def _document_files(folder: Path) -> list[Path]:
    return sorted(
        file
        for file in folder.rglob("*")
        if file.is_file()
        and file.suffix in DOCUMENT_SUFFIXES
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)  # .git, editor backups
    )


def _read_documents(file: Path, text_column: str) -> list:
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".txt" and DOC_SEPARATOR in text:
        return [doc.strip("\n") for doc in text.split(DOC_SEPARATOR)]  # write_corpus ends the file with a newline
    if file.suffix in (".txt", ".md"):
        return [text]
    try:  # JSON Lines, or (.json) one JSON list: datasets' json loader reads both
        if file.suffix == ".json" and text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not JSON Lines or a JSON list ({error})") from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or text_column not in record:
            fields = sorted(record) if isinstance(record, dict) else f"none (a {type(record).__name__})"
            raise ValueError(
                f"{file}, record {number}: no {text_column!r} field; its fields are {fields} (pass text_column=...)"
            )
    return [record[text_column] for record in records]


def _dataset_texts(source: str, val_fraction: float, text_column: str) -> tuple[list[str], list[str]]:
    path = Path(source)
    try:
        if path.is_dir() and any((path / name).exists() for name in _SAVED_TO_DISK):
            loaded = datasets.load_from_disk(source)  # load_dataset refuses save_to_disk folders
        else:
            loaded = datasets.load_dataset(source)
    except Exception as error:
        if path.exists():
            raise  # a dataset folder that does not load: its own error says why
        raise FileNotFoundError(
            f"data source {source!r} is neither a local file or folder (no such path) nor a dataset "
            f"datasets.load_dataset could load: {type(error).__name__}: {error}"
        ) from error
    loaded = datasets.DatasetDict(train=loaded) if isinstance(loaded, datasets.Dataset) else loaded
    train_split = "train" if "train" in loaded else next(iter(loaded)) if len(loaded) == 1 else None
    if train_split is None:
        raise ValueError(f"data source {source!r}: no 'train' split; its splits are {list(loaded)}")
    held_out = next((s for s in ("validation", "test") if s in loaded and s != train_split), None)
    texts = {}
    for split in filter(None, (train_split, held_out)):
        columns = loaded[split].column_names
        if text_column not in columns:
            raise ValueError(
                f"data source {source!r}: split {split!r} has no column {text_column!r}; its columns are "
                f"{columns} (pass text_column=...)"
            )
        texts[split] = list(loaded[split][text_column])
    if held_out is None:
        return _split_texts(texts[train_split], val_fraction, source)
    # Each side on its own: the split is the dataset's, but empty documents still go and neither side may be empty.
    train, _ = _split_texts(texts[train_split], 0.0, f"{source}[{train_split}]")
    validation, _ = _split_texts(texts[held_out], 0.0, f"{source}[{held_out}]")
    return train, validation


def _split_texts(texts: list[str], val_fraction: float, source: str) -> tuple[list[str], list[str]]:
    """Split by document with corpus.split_documents, the text as the id (see load_documents)."""
    docs = [{"id": text} for text in texts if isinstance(text, str) and text.strip()]
    if not docs:
        raise ValueError(f"data source {source!r} has no documents with text (it is empty or whitespace only)")
    train, validation = split_documents(docs, val_fraction)
    if val_fraction > 0 and (not train or not validation):
        donor = train or validation  # the side that got everything
        moved = donor[-1]["id"]
        if all(doc["id"] == moved for doc in donor):
            raise ValueError(
                f"data source {source!r} has a single distinct document, which cannot be split into train and "
                "validation: separate documents with '<|endoftext|>' lines, add files, or pass val_fraction=0"
            )
        kept = [doc for doc in donor if doc["id"] != moved]
        moved_docs = [doc for doc in donor if doc["id"] == moved]
        train, validation = (kept, moved_docs) if donor is train else (moved_docs, kept)
    return [doc["id"] for doc in train], [doc["id"] for doc in validation]


def _text_dataset(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts}, features=datasets.Features({"text": datasets.Value("string")}))


def token_byte_lengths(tokenizer) -> list[int]:
    """How many UTF-8 bytes of text each token id stands for (special tokens: 0), for bits per byte.

    In byte-level BPE every symbol of a token string is one byte (GPT-2's byte-to-unicode map), so the length of the
    token string is exact even for a token holding part of a multi-byte character, where decoding the id alone would
    give U+FFFD (3 bytes). Added tokens are plain text; a token outside the byte alphabet (not a byte-level
    tokenizer) falls back to the length of its decoding, which is approximate.

    Args:
        tokenizer: a transformers tokenizer.
    """
    byte_symbols = set(bytes_to_unicode().values())
    special = set(tokenizer.all_special_ids)
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    lengths = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special:
            lengths.append(0)
        elif i in added:
            lengths.append(len(added[i].encode("utf-8")))
        elif token is not None and all(symbol in byte_symbols for symbol in token):
            lengths.append(len(token))
        else:
            lengths.append(len(tokenizer.decode([i]).encode("utf-8")))
    return lengths


def _block_features(block_size: int) -> datasets.Features:
    return datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32"), length=block_size), "num_bytes": datasets.Value("int64")}
    )


def encode_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text's token ids followed by the end-of-text id: the one tokenization of documents for training, packed
    in memory (`tokenize_and_pack`) or written to token shards (training/shards.py). A literal "<|endoftext|>" in a
    text is plain text (split_special_tokens), so the only EOS ids are the appended ones."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, which must end every document")
    # verbose=False: a document longer than model_max_length is fine here, it is cut into blocks
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)
    return [ids + [eos] for ids in encoded["input_ids"]]


def tokenize_and_pack(docs: datasets.Dataset, tokenizer, block_size: int) -> datasets.Dataset:
    """Tokenize documents into one stream, an EOS after each, and cut it into rows of exactly `block_size` ids.

    Blocks run across documents (the EOS marks where one ends), so nothing is padding; the tail shorter than a block
    is dropped (under block_size tokens per split). A literal "<|endoftext|>" in a text is tokenized as plain text:
    the only EOS ids are the appended ones. Column "num_bytes": the UTF-8 bytes of text each block's tokens stand
    for (`token_byte_lengths`, EOS 0), the denominator of bits per byte.

    Args:
        docs: a dataset with a "text" column, one document per row, in order.
        tokenizer: a transformers tokenizer with an `eos_token_id`.
        block_size: ids per row.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be at least 1")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id, which must end every document")
    byte_lengths = token_byte_lengths(tokenizer)
    carry: list[int] = []  # tokens not yet in a block: the next batch's documents continue them
    total = 0

    def pack(batch: dict) -> dict:
        nonlocal total
        for ids in encode_documents(batch["text"], tokenizer):
            carry.extend(ids)
            total += len(ids)
        n = len(carry) // block_size
        blocks = [carry[i * block_size : (i + 1) * block_size] for i in range(n)]
        del carry[: n * block_size]
        return {"input_ids": blocks, "num_bytes": [sum(byte_lengths[t] for t in block) for block in blocks]}

    # The carry makes the map stateful: batches must run in order in one process (num_proc=None), never from a cache.
    blocks = docs.map(
        pack,
        batched=True,
        remove_columns=docs.column_names,
        features=_block_features(block_size),
        keep_in_memory=True,
        load_from_cache_file=False,
        desc="tokenize and pack",
    )
    if len(blocks) == 0:
        raise ValueError(
            f"the documents make {total} tokens (one EOS per document included), fewer than one block of "
            f"block_size={block_size}"
        )
    return blocks


def build_datasets(
    spec: str,
    tokenizer,
    block_size: int,
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    cache_dir: str | Path = "data",
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load, tokenize and pack every source of a data spec into (train_blocks, validation_blocks).

    Columns "input_ids" (block_size int32 ids), "num_bytes", "source" (the block's source as named in the spec). No
    format is set: `torch.tensor(ds["input_ids"])` gives the (N, block_size) blocks. Several sources are interleaved
    (`interleave_datasets(stopping_strategy="all_exhausted")`): each block comes from source i with probability
    weight_i until every source is used up once, so shares follow the weights and a source short for its weight is
    repeated (about max_i(blocks_i / weight_i) blocks in all). Validation concatenates the sources' held-out blocks,
    unweighted: each is evaluated on its own documents; it is empty with val_fraction=0.

    Args:
        spec: sources and weights, see `parse_data_spec`.
        tokenizer: a transformers tokenizer with an `eos_token_id`.
        block_size: ids per block (the longest sequence length trained on).
        seed: seeds the interleaving.
        val_fraction: see `load_documents`.
        cache_dir: see `load_documents`.
    """
    sources = parse_data_spec(spec)
    train_parts, validation_parts = [], []
    for source, _ in sources:
        docs = load_documents(source, val_fraction=val_fraction, cache_dir=cache_dir)
        for split, parts in (("train", train_parts), ("validation", validation_parts)):
            if len(docs[split]) == 0:
                continue  # only validation, with val_fraction=0
            try:
                blocks = tokenize_and_pack(docs[split], tokenizer, block_size)
            except ValueError as error:
                hint = ": raise val_fraction or lower the block size" if split == "validation" else ""
                raise ValueError(f"data source {source!r}, {split} split: {error}{hint}") from error
            parts.append(blocks.add_column("source", [source] * len(blocks)))
    if len(train_parts) == 1:
        train = train_parts[0]
    else:
        weights = [weight for _, weight in sources]
        train = datasets.interleave_datasets(
            train_parts, probabilities=weights, seed=seed, stopping_strategy="all_exhausted"
        )
    if validation_parts:
        validation = datasets.concatenate_datasets(validation_parts)
    else:
        features = datasets.Features({**_block_features(block_size), "source": datasets.Value("string")})
        validation = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return train, validation


class SequenceLengthSchedule:
    """Curriculum over sequence length: short sequences early (cheaper steps, the model first learns local
    statistics), the full length later.

    '128:0.25,256:0.25,512' trains at 128 for the first 25% of steps, 256 for the next 25%, 512 for the rest; '512'
    is constant. Every length divides the longest, which is the packed block size: a (B, L) batch of blocks becomes
    (B * L // l, l), the same tokens per step in every phase.

    Args:
        spec: comma-separated 'length:fraction' phases, the last one a bare length (it takes the remaining steps).
            Lengths are positive and divide the longest (they need not increase); fractions lie in (0, 1) and sum
            to less than 1.
    """

    def __init__(self, spec: str):
        self.spec = spec
        parts = [part.strip() for part in str(spec).split(",")]
        self.lengths: list[int] = []
        fractions: list[float] = []
        for i, part in enumerate(parts):
            length, sep, fraction = part.partition(":")
            last = i == len(parts) - 1
            try:
                self.lengths.append(int(length))
                fractions += [float(fraction)] if sep else []
            except ValueError:
                raise ValueError(f"sequence length schedule {spec!r}: {part!r} is not 'length:fraction'") from None
            if self.lengths[-1] < 1:
                raise ValueError(f"sequence length schedule {spec!r}: length {length!r} must be positive")
            if last and sep:
                raise ValueError(f"sequence length schedule {spec!r}: the last phase {part!r} takes no fraction")
            if not last and not (sep and 0 < fractions[-1] < 1):
                raise ValueError(f"sequence length schedule {spec!r}: {part!r} needs a fraction in (0, 1)")
        if sum(fractions) >= 1:
            raise ValueError(f"sequence length schedule {spec!r}: fractions sum to {sum(fractions)}, not below 1")
        if bad := [length for length in self.lengths if self.max_length % length]:
            raise ValueError(
                f"sequence length schedule {spec!r}: {bad} do not divide the longest length {self.max_length}"
            )
        self.ends = list(itertools.accumulate(fractions))  # where each phase but the last ends, as a share of steps

    @property
    def max_length(self) -> int:
        """The longest length: the packed block size."""
        return max(self.lengths)

    def length_at(self, step: int, max_steps: int) -> int:
        """The sequence length at `step` (0-based) of a `max_steps` run; steps past the end keep the last length."""
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be at least 1")
        for length, end in zip(self.lengths, self.ends, strict=False):  # the last phase has no end
            if step < round(end * max_steps):  # round: 0.1 + 0.2 is 0.30000000000000004
                return length
        return self.lengths[-1]

    @staticmethod
    def reshape(input_ids: torch.Tensor, length: int) -> torch.Tensor:
        """(B, L) blocks -> (B * L // length, length) rows; row-major, so tokens keep their order."""
        batch, block = input_ids.shape
        if block % length:
            raise ValueError(f"length {length} does not divide the block length {block}")
        return input_ids.reshape(batch * block // length, length)  # (B * L / l, l)

    def check_positions(self, config) -> None:
        """Fail early if the model cannot take the longest length.

        Learned and sinusoidal position tables have `max_position_embeddings` rows and nothing past them; rope,
        alibi and none compute positions on the fly, so any length runs (how well they extrapolate past the
        trained length is another matter).

        Args:
            config: the model's config (`position_embedding`, `max_position_embeddings`).
        """
        kind = getattr(config, "position_embedding", None)
        if kind in ("learned", "sinusoidal") and self.max_length > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {self.max_length} exceeds max_position_embeddings={config.max_position_embeddings}"
                f" of the model's {kind} position table"
            )
