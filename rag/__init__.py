"""rag: a FAISS-free retriever for retrieval-augmented generation.

Chunk documents with the encoder's own tokenizer (`chunking`), score them with BM25 built on scipy.sparse (`bm25`,
parity with bm25s and rank_bm25) and with mean-pooled sentence embeddings searched exactly by a matrix product
(`dense`), fuse both by reciprocal rank fusion, and keep it all in an index folder of JSON + safetensors (`index`).
Entry scripts: `tiny-hf index` (build) and `tiny-hf search` (query).
"""

import importlib

# Names resolve on first use (PEP 562), so `python -m rag.index` does not import rag.index twice (runpy warns when the
# package imports the module it is about to run) and `import rag` stays light.
_EXPORTS = {
    "BM25": "bm25",
    "BM25_VARIANTS": "bm25",
    "WordAnalyzer": "bm25",
    "top_k": "bm25",
    "Chunk": "chunking",
    "chunk_documents": "chunking",
    "chunk_text": "chunking",
    "STORAGE_DTYPES": "dense",
    "Encoder": "dense",
    "VectorStore": "dense",
    "default_encoder_path": "dense",
    "mean_pool": "dense",
    "CorruptIndexError": "index",
    "EncoderMismatchError": "index",
    "Hit": "index",
    "RagIndex": "index",
    "reciprocal_rank_fusion": "index",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BM25",
    "BM25_VARIANTS",
    "STORAGE_DTYPES",
    "Chunk",
    "CorruptIndexError",
    "Encoder",
    "EncoderMismatchError",
    "Hit",
    "RagIndex",
    "VectorStore",
    "WordAnalyzer",
    "chunk_documents",
    "chunk_text",
    "default_encoder_path",
    "mean_pool",
    "reciprocal_rank_fusion",
    "top_k",
]
