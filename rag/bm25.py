"""BM25 from scratch on scipy.sparse matrices, with the variants the common libraries use.

BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond") scores a document d for a
query q as

    score(q, d) = sum over query tokens t of  idf(t) * tfc(tf(t, d), |d|)

with tf the count of t in d, |d| the document length in tokens and avgdl the mean length. The term-frequency
component saturates with k1 and normalises the length with b:

    tfc = tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))

Implementations differ in the idf and in details of tfc (Kamphuis et al. 2020, "Which BM25 Do You Mean?"). The
variants below are those of bm25s (Lù 2024), whose scores we reproduce exactly, plus "okapi", the one of
rank_bm25's `BM25Okapi`:

| variant   | idf                                            | tfc                                       |
|-----------|------------------------------------------------|-------------------------------------------|
| robertson | ln((N - df + .5) / (df + .5)), floored at 0    | tf / (tf + k1 * norm)  (no k1 + 1 factor) |
| lucene    | ln(1 + (N - df + .5) / (df + .5))              | same as robertson                         |
| atire     | ln(N / df)                                     | tf * (k1 + 1) / (tf + k1 * norm)          |
| bm25l     | ln((N + 1) / (df + .5))                        | (k1 + 1)(c + delta) / (k1 + c + delta)    |
| bm25+     | ln((N + 1) / df)                               | atire's tfc + delta                       |
| okapi     | ln((N - df + .5) / (df + .5)), negative ones   | atire's tfc                               |
|           | replaced by epsilon * mean idf                 |                                           |

(norm = 1 - b + b * |d| / avgdl, c = tf / norm.) bm25l and bm25+ give a document without the term a score too
(tfc(0) > 0). Repeated query tokens count again, as in both libraries. Tokens not in the vocabulary are ignored.

Storage: the raw statistics (a documents x vocabulary CSR matrix of term counts, and the vocabulary), which is what
can be added to and deleted from; the weighted matrix idf * tfc is rebuilt from them lazily (eager scoring as in
bm25s: a query is then one sparse column gather and a sum).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

# A small English stopword list (the one of bm25s / scikit-learn's common core); opt-in, off by default.
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with".split()
)


class WordAnalyzer:
    """The default analyzer: lowercase, `\\w+` tokens (Unicode word characters), optional stopword removal.

    Args:
        lowercase: fold case first.
        stopwords: None, "english" (`ENGLISH_STOPWORDS`) or an iterable of words to drop.
        min_length: drop tokens shorter than this (bm25s' own splitter keeps 2+ characters).
    """

    pattern = re.compile(r"\w+")

    def __init__(self, *, lowercase: bool = True, stopwords: str | Iterable[str] | None = None, min_length: int = 1):
        if isinstance(stopwords, str):
            if stopwords != "english":
                raise ValueError(f"stopwords={stopwords!r} is not one of [None, 'english', a list of words]")
            stopwords = ENGLISH_STOPWORDS
        self.lowercase = lowercase
        self.stopwords = frozenset(stopwords or ())
        self.min_length = min_length

    def __call__(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        return [t for t in self.pattern.findall(text) if len(t) >= self.min_length and t not in self.stopwords]

    def config(self) -> dict:
        return {"lowercase": self.lowercase, "stopwords": sorted(self.stopwords), "min_length": self.min_length}


# ---- idf functions: (df, n_docs, epsilon) -> idf, vectorised over the vocabulary ----
def _idf_robertson(df: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    return np.log(np.maximum((n - df + 0.5) / (df + 0.5), 1.0))  # bm25s floors the ratio at 1: idf >= 0


def _idf_lucene(df: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    return np.log1p((n - df + 0.5) / (df + 0.5))


def _idf_atire(df: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    return np.log(n / df)


def _idf_bm25l(df: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    return np.log((n + 1) / (df + 0.5))


def _idf_bm25plus(df: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    return np.log((n + 1) / df)


def _idf_okapi(df: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    # rank_bm25: a term in more than half the documents would score negatively; it gets epsilon x the mean idf
    # (the mean taken before the replacement, over the whole vocabulary).
    idf = np.log(n - df + 0.5) - np.log(df + 0.5)
    return np.where(idf < 0, epsilon * idf.mean(), idf) if len(idf) else idf


# ---- term-frequency components: (tf, doc_len / avgdl, k1, b, delta) -> tfc ----
def _tfc_robertson(tf: np.ndarray, rel_len: np.ndarray, k1: float, b: float, delta: float) -> np.ndarray:
    return tf / (k1 * (1 - b + b * rel_len) + tf)


def _tfc_atire(tf: np.ndarray, rel_len: np.ndarray, k1: float, b: float, delta: float) -> np.ndarray:
    return tf * (k1 + 1) / (tf + k1 * (1 - b + b * rel_len))


def _tfc_bm25l(tf: np.ndarray, rel_len: np.ndarray, k1: float, b: float, delta: float) -> np.ndarray:
    c = tf / (1 - b + b * rel_len)
    return (k1 + 1) * (c + delta) / (k1 + c + delta)


def _tfc_bm25plus(tf: np.ndarray, rel_len: np.ndarray, k1: float, b: float, delta: float) -> np.ndarray:
    return _tfc_atire(tf, rel_len, k1, b, delta) + delta


# variant -> (idf, tfc); every entry has the same signatures.
BM25_VARIANTS: dict[str, tuple[Callable, Callable]] = {
    "robertson": (_idf_robertson, _tfc_robertson),
    "lucene": (_idf_lucene, _tfc_robertson),
    "atire": (_idf_atire, _tfc_atire),
    "bm25l": (_idf_bm25l, _tfc_bm25l),
    "bm25+": (_idf_bm25plus, _tfc_bm25plus),
    "okapi": (_idf_okapi, _tfc_atire),
}


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest scores, best first; equal scores go to the lower index first.

    Scores of -inf (filtered out) are never returned, so fewer than k may come back.
    """
    scores = np.asarray(scores)
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), scores[:0]
    # argpartition finds a candidate set fast; ties straddling its edge are then resolved by a stable sort over
    # every index whose score reaches the k-th best, so which of two equal scores wins never depends on the partition.
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= kth)
    order = candidates[np.argsort(-scores[candidates], kind="stable")][:k]
    order = order[scores[order] > -np.inf]  # filtered out
    return order, scores[order]


class BM25:
    """A BM25 index over tokenized documents.

    Args:
        method: one of `BM25_VARIANTS` ("robertson", "lucene", "atire", "bm25l", "bm25+", "okapi").
        k1: term-frequency saturation (1.2-2.0 typical).
        b: length normalisation, 0 (none) to 1 (full).
        delta: the lower bound added by bm25l / bm25+ (ignored by the others).
        epsilon: okapi's floor for negative idf, as a fraction of the mean idf (ignored by the others).
        analyzer: text -> tokens; `WordAnalyzer()` by default; any callable works (e.g. a Hugging Face
            tokenizer's `tokenize`), but only a `WordAnalyzer` can be saved in an index.
    """

    def __init__(
        self,
        *,
        method: str = "lucene",
        k1: float = 1.5,
        b: float = 0.75,
        delta: float = 0.5,
        epsilon: float = 0.25,
        analyzer: Callable[[str], list[str]] | None = None,
    ):
        if method not in BM25_VARIANTS:
            raise ValueError(f"method={method!r} is not one of {list(BM25_VARIANTS)}")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"need k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
        self.method, self.k1, self.b, self.delta, self.epsilon = method, k1, b, delta, epsilon
        self.analyzer = analyzer if analyzer is not None else WordAnalyzer()
        self.vocab: dict[str, int] = {}
        self.tf = sp.csr_matrix((0, 0), dtype=np.float64)  # (n_docs, n_vocab) term counts
        self._weights: sp.csc_matrix | None = None  # (n_docs, n_vocab) idf * (tfc(tf) - tfc(0)), built lazily
        self._base: np.ndarray | None = None  # (n_vocab,) idf * tfc(0): what bm25l / bm25+ give every document

    # ---- building ----
    def _tokens(self, doc: str | Sequence[str]) -> list[str]:
        return self.analyzer(doc) if isinstance(doc, str) else list(doc)

    def index(self, corpus: Iterable[str | Sequence[str]]) -> BM25:
        """Index a corpus (texts, or token lists used as they are), replacing anything indexed before."""
        corpus = list(corpus)
        if not corpus:
            raise ValueError("the corpus is empty: nothing to index")
        self.vocab, self.tf = {}, sp.csr_matrix((0, 0), dtype=np.float64)
        return self.add(corpus)

    def add(self, corpus: Iterable[str | Sequence[str]]) -> BM25:
        """Append documents (texts or token lists); their indices follow the existing ones."""
        docs = [self._tokens(doc) for doc in corpus]
        if not docs:
            return self
        rows, cols = [], []
        for i, tokens in enumerate(docs):
            for tok in tokens:
                cols.append(self.vocab.setdefault(tok, len(self.vocab)))
                rows.append(i)
        # repeated (row, col) pairs are summed by scipy: that is the term count
        new = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(docs), len(self.vocab)), dtype=np.float64)
        old = self.tf.copy()
        old.resize((old.shape[0], len(self.vocab)))  # new terms: new (empty) columns for the old documents
        self.tf = sp.vstack([old, new], format="csr")
        self._weights = None
        return self

    def delete(self, doc_indices: Iterable[int]) -> BM25:
        """Remove documents by index (later ones move up); terms no document holds any more leave the vocabulary."""
        drop = np.zeros(self.n_docs, dtype=bool)
        drop[list(doc_indices)] = True
        self.tf = self.tf[~drop]
        df = np.diff(self.tf.tocsc().indptr)
        keep = np.flatnonzero(df > 0)
        if len(keep) < len(self.vocab):
            self.tf = self.tf[:, keep].tocsr()
            remap = {old: new for new, old in enumerate(keep)}
            self.vocab = {t: remap[j] for t, j in self.vocab.items() if j in remap}
        self._weights = None
        return self

    @property
    def n_docs(self) -> int:
        return self.tf.shape[0]

    def idf(self) -> np.ndarray:
        """(n_vocab,) idf of every vocabulary term under this variant."""
        df = np.diff(self.tf.tocsc().indptr).astype(np.float64)
        return BM25_VARIANTS[self.method][0](df, self.n_docs, self.epsilon)

    def _build_weights(self) -> None:
        idf_fn, tfc_fn = BM25_VARIANTS[self.method]
        doc_len = np.asarray(self.tf.sum(axis=1)).ravel()  # (n_docs,)
        avgdl = doc_len.mean() if self.n_docs else 1.0
        rel_len = doc_len / avgdl if avgdl > 0 else np.ones_like(doc_len)
        idf = self.idf()
        w = self.tf.tocoo()
        # tfc(0) does not depend on the length for any variant: subtracting it keeps the matrix sparse, and adding
        # idf * tfc(0) back per query token restores the exact score for bm25l / bm25+ (zero for the others).
        base_tfc = tfc_fn(np.zeros(1), np.ones(1), self.k1, self.b, self.delta)[0]
        data = idf[w.col] * (tfc_fn(w.data, rel_len[w.row], self.k1, self.b, self.delta) - base_tfc)
        self._weights = sp.csc_matrix((data, (w.row, w.col)), shape=self.tf.shape)
        self._base = idf * base_tfc

    # ---- scoring ----
    def query_vector(self, query: str | Sequence[str]) -> np.ndarray:
        """(n_vocab,) count of each vocabulary term in the query (repeats count again; unknown tokens are dropped)."""
        q = np.zeros(len(self.vocab))
        for tok in self._tokens(query):
            if (j := self.vocab.get(tok)) is not None:
                q[j] += 1
        return q

    def get_scores(self, query: str | Sequence[str]) -> np.ndarray:
        """(n_docs,) BM25 score of every document for a query (text, or a token list)."""
        if self._weights is None:
            self._build_weights()
        counts: dict[int, int] = {}
        for tok in self._tokens(query):
            if (j := self.vocab.get(tok)) is not None:
                counts[j] = counts.get(j, 0) + 1
        # Only the query's columns of the CSC matrix are touched, read straight from its arrays (scipy's column
        # slicing costs more than the arithmetic at these sizes); a column's row indices are unique, so += is exact.
        w = self._weights
        scores = np.zeros(self.n_docs)
        for j, count in counts.items():
            start, end = w.indptr[j], w.indptr[j + 1]
            scores[w.indices[start:end]] += count * w.data[start:end]
        return scores + sum(count * self._base[j] for j, count in counts.items())

    def retrieve(self, query: str | Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the top k documents, best first, ties to the lower index."""
        return top_k(self.get_scores(query), k)

    # ---- saving (arrays for safetensors, the rest for JSON) ----
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The statistics as arrays (CSR term counts) and a JSON-able dict (parameters, analyzer, vocabulary)."""
        if not isinstance(self.analyzer, WordAnalyzer):
            raise ValueError(
                f"only a WordAnalyzer can be saved; this BM25 uses {type(self.analyzer).__name__}: rebuild it on load"
            )
        arrays = {
            "tf_data": self.tf.data.astype(np.float32),
            "tf_indices": self.tf.indices.astype(np.int64),
            "tf_indptr": self.tf.indptr.astype(np.int64),
        }
        vocab = [None] * len(self.vocab)
        for tok, j in self.vocab.items():
            vocab[j] = tok
        meta = {
            "method": self.method,
            "k1": self.k1,
            "b": self.b,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "analyzer": self.analyzer.config(),
            "vocab": vocab,
            "shape": list(self.tf.shape),
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> BM25:
        bm25 = cls(
            method=meta["method"],
            k1=meta["k1"],
            b=meta["b"],
            delta=meta["delta"],
            epsilon=meta["epsilon"],
            analyzer=WordAnalyzer(**meta["analyzer"]),
        )
        shape = tuple(meta["shape"])
        if shape[1] != len(meta["vocab"]) or len(arrays["tf_indptr"]) != shape[0] + 1:
            raise ValueError(f"BM25 statistics do not match: shape {shape}, vocabulary {len(meta['vocab'])}")
        bm25.tf = sp.csr_matrix(
            (arrays["tf_data"].astype(np.float64), arrays["tf_indices"], arrays["tf_indptr"]), shape=shape
        )
        bm25.vocab = {tok: j for j, tok in enumerate(meta["vocab"])}
        return bm25
