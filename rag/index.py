"""A retrieval index in a folder: chunks, BM25 statistics and dense vectors, searched by BM25, dense or hybrid.

The folder holds no pickle (loading one runs code) and nothing binary that safetensors cannot check:

    index.json           format version, encoder fingerprint, tokenizer hash, parameters, and size + sha256 of
                         every other file (written last: a folder without it is not an index)
    chunks.json          the chunks: doc_id, text, start/end offsets, token count, document metadata
    vectors.safetensors  the chunk embeddings (fp32, fp16, or int8 + one scale per vector)
    bm25.safetensors     term counts as a CSR matrix (chunks x vocabulary)
    bm25.json            BM25 parameters, analyzer and vocabulary

Loading checks every file against its recorded size and hash (a truncated or edited file is a clear error, not a
wrong answer), and checks the encoder: the index records the embedding of a fixed probe text and the hash of the
tokenizer, and an encoder whose probe embedding or tokenizer differs is refused, since its query vectors would not
be comparable with the stored ones.

Hybrid search fuses the BM25 and dense rankings with reciprocal rank fusion (Cormack, Clarke & Buettcher 2009,
"Reciprocal Rank Fusion outperforms Condorcet and individual Rank Learning Methods"): score(d) = sum over rankings of
1 / (k + rank(d)), ranks from 1, k = 60. It needs no score calibration between the two retrievers, which is why it is
the usual default.

CLI: `tiny-hf index --data embedded|PATH --out DIR [--encoder PATH] [--chunk-size 200] [--overlap 32]`
(`--append` adds documents to the index at --out, `--delete ID ...` removes some).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tiny_hf.corpus import stable_fraction
from tiny_hf.options import parse_options
from tiny_hf.system import write_atomic

from .bm25 import BM25, BM25_VARIANTS, WordAnalyzer, top_k
from .chunking import Chunk, chunk_documents, normalize_documents
from .dense import STORAGE_DTYPES, Encoder, VectorStore

FORMAT = "tiny-hf-rag-index"
FORMAT_VERSION = 1
CONFIG_FILE = "index.json"
DATA_FILES = ("chunks.json", "vectors.safetensors", "bm25.safetensors", "bm25.json")
SEARCH_MODES = ("bm25", "dense", "hybrid")
# Two embeddings of the probe text count as the same encoder within this (fp32 noise across machines and BLAS).
PROBE_ATOL = 1e-4


class CorruptIndexError(ValueError):
    """An index folder whose files are missing, truncated, edited or inconsistent."""


class EncoderMismatchError(ValueError):
    """The encoder or tokenizer given at load time is not the one the index was built with."""


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], *, k: int = 60) -> list[tuple[int, float]]:
    """Fuse rankings (each a list of ids, best first) by reciprocal rank fusion (Cormack et al. 2009).

    score(id) = sum over the rankings that contain it of 1 / (k + rank), ranks from 1.

    Returns:
        (id, score) pairs, best first; equal scores go to the lower id first.
    """
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides the tokens: vocabulary, merges, normaliser, pre-tokeniser (not padding/truncation)."""
    if getattr(tokenizer, "is_fast", False):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        for key in ("truncation", "padding"):
            spec.pop(key, None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


@dataclass
class Hit:
    """One search result: a chunk, its score under the mode searched, and its rank (from 1)."""

    rank: int
    score: float
    chunk_index: int
    doc_id: str
    text: str
    start: int
    end: int
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class RagIndex:
    """Chunks of a corpus with a BM25 index and dense vectors over them.

    Args:
        encoder: the dense encoder (its tokenizer also sizes the chunks); None loads all-MiniLM-L6-v2.
        chunk_size: tokens per chunk at most; at most the encoder window minus its special tokens.
        overlap: tokens shared by consecutive chunks of a long passage.
        bm25_method: one of `BM25_VARIANTS`.
        k1: BM25 term-frequency saturation.
        b: BM25 length normalisation.
        stopwords: None or "english" (removed before BM25 only).
        storage: dense vector storage, one of `STORAGE_DTYPES`.
    """

    def __init__(
        self,
        encoder: Encoder | None = None,
        *,
        chunk_size: int = 200,
        overlap: int = 32,
        bm25_method: str = "lucene",
        k1: float = 1.5,
        b: float = 0.75,
        stopwords: str | None = None,
        storage: str = "fp32",
    ):
        self._encoder = encoder if encoder is not None else Encoder()
        if chunk_size > self._encoder.max_text_tokens:
            raise ValueError(
                f"chunk_size={chunk_size} does not fit the encoder window: at most {self._encoder.max_text_tokens} "
                f"text tokens ({self._encoder.max_length} minus special tokens) for {self._encoder.name}"
            )
        self.chunk_size, self.overlap = chunk_size, overlap
        self.bm25 = BM25(method=bm25_method, k1=k1, b=b, analyzer=WordAnalyzer(stopwords=stopwords))
        self.vectors = VectorStore(self._encoder.dim, storage=storage)
        self.chunks: list[Chunk] = []
        self.encoder_info = self._encoder.fingerprint()
        self.tokenizer_info = {"name": self._encoder.name, "sha256": tokenizer_hash(self._encoder.tokenizer)}

    # ---- the encoder is loaded lazily after `load`, so BM25-only searches never pay for it ----
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            name = self.encoder_info["name"]
            try:
                encoder = Encoder(name)
            except (OSError, ValueError) as e:
                raise EncoderMismatchError(
                    f"cannot load the encoder {name!r} this index was built with ({e}); pass encoder=... / --encoder"
                ) from e
            self._check_encoder(encoder)
            self._encoder = encoder
        return self._encoder

    def _check_encoder(self, encoder: Encoder) -> None:
        rec, tok = self.encoder_info, self.tokenizer_info
        if tokenizer_hash(encoder.tokenizer) != tok["sha256"]:
            raise EncoderMismatchError(
                f"tokenizer mismatch: the index was chunked with the tokenizer of {tok['name']!r}, and "
                f"{encoder.name!r} has a different one; load with the same encoder or rebuild the index"
            )
        if encoder.dim != rec["dim"]:
            raise EncoderMismatchError(
                f"encoder mismatch: the index holds {rec['dim']}-dim vectors from {rec['name']!r}; "
                f"{encoder.name!r} makes {encoder.dim}-dim vectors"
            )
        probe = torch.tensor(encoder.fingerprint()["probe"])
        if not torch.allclose(probe, torch.tensor(rec["probe"]), atol=PROBE_ATOL):
            raise EncoderMismatchError(
                f"encoder mismatch: {encoder.name!r} embeds the probe text differently from {rec['name']!r}, the "
                f"encoder of this index (other weights or pooling); load with that encoder or rebuild the index"
            )

    # ---- contents ----
    @property
    def doc_ids(self) -> list[str]:
        """The ids of the indexed documents, in the order they were added."""
        return list(dict.fromkeys(c.doc_id for c in self.chunks))

    def __len__(self) -> int:
        return len(self.chunks)

    def add(self, documents: Iterable[dict | str], *, progress: Callable | None = None) -> int:
        """Chunk, embed and index documents (dicts with "text", "id" and metadata fields, or strings).

        Returns:
            The number of chunks added. Raises ValueError for an id that is already indexed.
        """
        docs = normalize_documents(documents)
        present = set(self.doc_ids)
        if clash := [d["id"] for d in docs if d["id"] in present]:
            raise ValueError(f"documents already indexed: {clash[:5]}; delete them first to replace them")
        chunks = chunk_documents(docs, self.encoder.tokenizer, chunk_size=self.chunk_size, overlap=self.overlap)
        # the chunker sized them to the window; a retokenised boundary may differ by a token, so truncate silently
        vectors = self.encoder.encode([c.text for c in chunks], overflow="truncate", progress=progress)
        self.vectors.add(vectors)
        self.bm25.add(c.text for c in chunks)
        self.chunks += chunks
        return len(chunks)

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents (all their chunks) by id; returns the number of chunks removed. Unknown ids: KeyError."""
        doc_ids = set(doc_ids)
        if missing := doc_ids - set(self.doc_ids):
            raise KeyError(f"documents not in the index: {sorted(missing)[:5]}")
        drop = [i for i, c in enumerate(self.chunks) if c.doc_id in doc_ids]
        self.vectors.delete(drop)
        self.bm25.delete(drop)
        dropped = set(drop)
        self.chunks = [c for i, c in enumerate(self.chunks) if i not in dropped]
        return len(drop)

    # ---- search ----
    def filter_mask(self, *, prefix: str | None = None, where: dict | None = None) -> np.ndarray:
        """(n_chunks,) True for chunks whose doc_id starts with `prefix` and whose metadata matches every
        key == value of `where` (values compared as given, or as strings: CLI filters arrive as strings)."""
        mask = np.ones(len(self.chunks), dtype=bool)
        for i, c in enumerate(self.chunks):
            if prefix is not None and not c.doc_id.startswith(prefix):
                mask[i] = False
            for key, value in (where or {}).items():
                have = c.doc_id if key == "id" else c.metadata.get(key)
                if have != value and (have is None or str(have) != str(value)):
                    mask[i] = False
        return mask

    def _bm25_ranking(self, query: str, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.bm25.get_scores(query)
        terms = np.flatnonzero(self.bm25.query_vector(query))
        matched = np.asarray(self.bm25.tf[:, terms].sum(axis=1)).ravel() > 0  # chunks with a query term
        return top_k(np.where(mask & matched, scores, -np.inf), k)

    def _dense_ranking(self, query: str, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.encoder.encode([query], overflow="warn")  # a query past the window is truncated with a warning
        scores = self.vectors.scores(q)[0].numpy().astype(np.float64)
        return top_k(np.where(mask, scores, -np.inf), k)

    def search(
        self,
        query: str,
        *,
        k: int = 5,
        mode: str = "hybrid",
        prefix: str | None = None,
        where: dict | None = None,
        rrf_k: int = 60,
        candidates: int = 100,
    ) -> list[Hit]:
        """The top k chunks for a query.

        Args:
            query: the query text.
            k: results wanted (fewer come back when fewer chunks pass the filter or, for BM25, share a word).
            mode: "bm25", "dense", or "hybrid" (reciprocal rank fusion of both top-`candidates` lists).
            prefix: keep chunks whose document id starts with this (e.g. "topic/").
            where: keep chunks whose document metadata has these key == value pairs (e.g. {"source": "..."}).
            rrf_k: the k of reciprocal rank fusion.
            candidates: how deep each ranking goes before fusion.
        """
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(SEARCH_MODES)}")
        if k <= 0:
            raise ValueError(f"k={k} must be positive")
        if not query.strip():
            raise ValueError("the query is empty")
        mask = self.filter_mask(prefix=prefix, where=where)
        if mode == "bm25":
            ranked = zip(*self._bm25_ranking(query, mask, k), strict=True)
        elif mode == "dense":
            ranked = zip(*self._dense_ranking(query, mask, k), strict=True)
        else:
            depth = max(k, candidates)
            lists = [self._bm25_ranking(query, mask, depth)[0], self._dense_ranking(query, mask, depth)[0]]
            ranked = reciprocal_rank_fusion([r.tolist() for r in lists], k=rrf_k)[:k]
        hits = []
        for rank, (i, score) in enumerate(ranked, start=1):
            c = self.chunks[int(i)]
            hits.append(Hit(rank, float(score), int(i), c.doc_id, c.text, c.start, c.end, c.metadata))
        return hits

    # ---- saving and loading ----
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index folder (created if missing; an index already there is replaced)."""
        from safetensors.numpy import save as save_numpy
        from safetensors.torch import save as save_torch

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        bm25_arrays, bm25_meta = self.bm25.state()
        payloads = {
            "chunks.json": json.dumps([c.to_dict() for c in self.chunks], ensure_ascii=False).encode(),
            "vectors.safetensors": save_torch(self.vectors.state(), metadata={"storage": self.vectors.storage}),
            "bm25.safetensors": save_numpy(bm25_arrays),
            "bm25.json": json.dumps(bm25_meta, ensure_ascii=False).encode(),
        }
        files = {}
        for name, data in payloads.items():
            write_atomic(out / name, data)  # a crash mid-save leaves no half-written file
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "encoder": self.encoder_info,
            "tokenizer": self.tokenizer_info,
            "chunking": {"chunk_size": self.chunk_size, "overlap": self.overlap},
            "storage": self.vectors.storage,
            "n_chunks": len(self.chunks),
            "n_documents": len(self.doc_ids),
            "files": files,
        }
        write_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")  # last: it makes the folder an index
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, *, encoder: Encoder | None = None) -> RagIndex:
        """Read an index folder, checking every file. With `encoder`, check it is the index's own (else
        EncoderMismatchError); without, the recorded encoder is loaded (and checked) on the first dense search."""
        from safetensors.numpy import load as load_numpy
        from safetensors.torch import load as load_torch

        root = Path(path)
        config_path = root / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{root} is not an index folder: no {CONFIG_FILE} (build one with rag.index)")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptIndexError(f"{config_path} is not valid JSON ({e}): the index is damaged; rebuild it") from e
        if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
            raise CorruptIndexError(
                f"{config_path}: format {config.get('format')!r} version {config.get('version')!r}; this code reads "
                f"{FORMAT!r} version {FORMAT_VERSION}"
            )
        raw = {}
        for name in DATA_FILES:
            file, expected = root / name, config["files"].get(name, {})
            if not file.is_file():
                raise CorruptIndexError(f"{file} is missing: the index is incomplete; rebuild it")
            data = file.read_bytes()
            if len(data) != expected.get("bytes"):
                raise CorruptIndexError(
                    f"{file} has {len(data)} bytes, {expected.get('bytes')} expected: truncated or overwritten"
                )
            if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
                raise CorruptIndexError(f"{file} does not match its recorded sha256: the file was changed or damaged")
            raw[name] = data

        index = cls.__new__(cls)
        index._encoder = None
        index.encoder_info, index.tokenizer_info = config["encoder"], config["tokenizer"]
        index.chunk_size, index.overlap = config["chunking"]["chunk_size"], config["chunking"]["overlap"]
        try:
            index.chunks = [Chunk(**c) for c in json.loads(raw["chunks.json"])]
            index.vectors = VectorStore.from_state(load_torch(raw["vectors.safetensors"]), storage=config["storage"])
            index.bm25 = BM25.from_state(load_numpy(raw["bm25.safetensors"]), json.loads(raw["bm25.json"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptIndexError(f"{root}: cannot read the index files ({e})") from e
        sizes = {"chunks": len(index.chunks), "vectors": len(index.vectors), "bm25 rows": index.bm25.n_docs}
        if len(set(sizes.values())) != 1 or len(index.chunks) != config["n_chunks"]:
            raise CorruptIndexError(f"{root}: the parts disagree on the number of chunks: {sizes}")
        if encoder is not None:
            index._check_encoder(encoder)
            index._encoder = encoder
        return index


# ---- CLI ----
def sample_documents(docs: list[dict], max_docs: int | None) -> list[dict]:
    """A fixed pseudo-random sample of `max_docs` documents (the lowest `stable_fraction` of the id), in id order;
    None or 0 keeps all. The one sample `rag.index --max-docs`, rag.evaluate and bench/rag_bench.py take, so their
    indexes agree."""
    if not max_docs or max_docs >= len(docs):
        return docs
    ids = [str(d.get("id", i)) for i, d in enumerate(docs)]
    order = sorted(range(len(docs)), key=lambda i: stable_fraction(ids[i]))[:max_docs]
    return [docs[i] for i in sorted(order, key=lambda i: ids[i])]


def load_documents(data: str, *, max_docs: int | None = None) -> list[dict]:
    """Documents from `--data`: "embedded" (the project corpus: pydoc topics + stdlib docstrings), "topics" (the pydoc
    topics alone: small and fast), a `.jsonl` file (one {"text", "id"?, ...} per line, e.g. data/corpus/train.jsonl),
    a text file (one document), or a folder (every .txt / .md / .rst file under it; ids are relative paths)."""
    from tiny_hf.corpus import build_documents, topic_documents

    if data == "embedded":
        docs = build_documents()
    elif data == "topics":
        docs = topic_documents()
    else:
        path = Path(data)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".rst") and p.is_file())
            docs = [{"id": str(p.relative_to(path)), "text": p.read_text(encoding="utf-8")} for p in files]
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                docs = [json.loads(line) for line in f if line.strip()]
        elif path.is_file():
            docs = [{"id": path.name, "text": path.read_text(encoding="utf-8")}]
        else:
            raise FileNotFoundError(f"--data {data!r} is not 'embedded', 'topics', a file or a folder")
    if not any(str(doc.get("text", "")).strip() for doc in docs):
        raise ValueError(f"--data {data!r}: no text in its {len(docs)} document(s)")
    return sample_documents(docs, max_docs)


def load_rag_index(path: str, *, flag: str = "--rag-index", encoder: Encoder | None = None) -> RagIndex:
    """The `RagIndex` in the folder `path` (a script's `flag`, e.g. --rag-index); a missing or damaged folder, or an
    encoder that does not match it, exits with a one-line error."""
    try:
        return RagIndex.load(path, encoder=encoder)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SystemExit(f"error: cannot load {flag} {path!r}: {reason}") from None


@dataclass
class IndexOptions:
    # ---- input / output ----
    out: str = field(metadata={"help": "the index folder to write"})
    data: str = field(default="embedded", metadata={"help": "'embedded', 'topics', a .jsonl/.txt file or a folder"})
    max_docs: int | None = field(
        default=None, metadata={"help": "index a fixed sample of N documents (rag.evaluate's)"}
    )
    append: bool = field(default=False, metadata={"help": "add the documents to the index already at --out"})
    delete: list[str] | None = field(
        default=None, metadata={"help": "remove these documents (ids) from the index at --out", "metavar": "ID"}
    )
    # ---- chunking ----
    chunk_size: int = field(default=200, metadata={"help": "tokens per chunk at most"})
    overlap: int = field(default=32, metadata={"help": "tokens shared by consecutive chunks"})
    # ---- dense encoder ----
    encoder: str | None = field(
        default=None, metadata={"help": "model folder for embeddings (default all-MiniLM-L6-v2)"}
    )
    storage: str = field(default="fp32", metadata={"help": "vector storage dtype", "choices": list(STORAGE_DTYPES)})
    batch_size: int = field(default=32, metadata={"help": "texts per forward pass of the encoder"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    # ---- bm25 ----
    bm25_method: str = field(default="lucene", metadata={"help": "BM25 variant", "choices": list(BM25_VARIANTS)})
    k1: float = field(default=1.5, metadata={"help": "term-frequency saturation"})
    b: float = field(default=0.75, metadata={"help": "length normalisation"})
    stopwords: str | None = field(
        default=None, metadata={"help": "drop stopwords before BM25", "choices": ["english"]}
    )


def _open_index(options: IndexOptions) -> RagIndex:
    """The index at --out (to append to or delete from), or a new, empty one with the options' parameters."""
    encoder = Encoder(options.encoder, batch_size=options.batch_size, device=options.device)
    if options.append or options.delete:
        return load_rag_index(options.out, flag="--out", encoder=encoder)
    return RagIndex(
        encoder,
        chunk_size=options.chunk_size,
        overlap=options.overlap,
        bm25_method=options.bm25_method,
        k1=options.k1,
        b=options.b,
        stopwords=options.stopwords,
        storage=options.storage,
    )


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(IndexOptions, argv=argv, description=__doc__)
    from tqdm.auto import tqdm

    def progress(batches):
        return tqdm(batches, desc="embedding", unit="batch", disable=not sys.stderr.isatty())

    adding = not options.delete or options.append
    documents = load_documents(options.data, max_docs=options.max_docs) if adding else []  # bad --data fails first
    index = _open_index(options)
    removed = index.delete(options.delete) if options.delete else 0
    added = index.add(documents, progress=progress) if adding else 0
    index.save(options.out)
    summary = {
        "out": str(options.out),
        "documents": len(index.doc_ids),
        "chunks": len(index),
        "added_chunks": added,
        "removed_chunks": removed,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
