"""Retrieval quality on a held-out query set built from the corpus itself, for our retrievers and their peers.

The query set. Every query comes from one sentence of the indexed chunks, and that chunk is its one relevant passage:

- docstrings (`stdlib/...` documents): the first sentence of a function, method or class docstring, under its
  `module.name(args)` heading; the answer is the qualified name (`json.dumps`);
- pydoc topics (`topic/...`): the first sentence of a prose paragraph (not an indented block, not a heading);
  the answer is the sentence.

Kept: sentences of 6 to 40 words that lie wholly inside exactly one chunk (not in the overlap of two chunks, not cut
by a chunk border) and whose text occurs once among all candidates (copied docstrings are dropped), so each query has
exactly one relevant chunk. At most `per_doc` per document; then the first `n` by a hash of (doc id, offset), which
depends on nothing else, so the same index always gives the same queries.

The rewrite, applied in this order, so lexical overlap with the chunk is partial (not total):

1. markup out: ``x``, `x`, :role:`x`, *x* become x; text in parentheses and after the first ":" or ";" is dropped;
2. the object's name out (docstrings): words equal to a part of the qualified name (`json`, `dumps`) and "self";
3. synonyms: each word found in `SYNONYMS` (a fixed table of ~60 docstring words: return -> give back, string ->
   text, create -> build, ...) is replaced; the articles a/an/the are dropped; at most 16 words are kept;
4. a question template: a docstring that starts with an imperative verb ("Serialize obj to a JSON formatted str.")
   becomes "how do I convert obj to formatted text?" or "which function converts obj to formatted text?" (chosen by
   the hash; "JSON" went with the name `json.dumps`); another docstring becomes "which class is this: ...?" (or
   function, method); a topic sentence becomes "where is it explained that ...?".

Metrics as BEIR computes them with pytrec_eval (Thakur et al. 2021): recall@k = |relevant in the top k| /
|relevant|; MRR@10 = 1 / rank of the first relevant hit in the top 10 (0 if none); nDCG@10 with linear gain (the
relevance grade) and a log2(rank + 1) discount, divided by the ideal DCG of the qrels. Each is averaged over the
queries, and equals ranx's recall@k, mrr@10 and ndcg@10 (tests/test_rag_eval.py). With one relevant chunk per query,
recall@k is also the hit rate (ranx hit_rate@k, trec_eval success@k). Ties in score are broken by the lower chunk
index (trec_eval breaks them by document name, ranx leaves them to an unstable sort; any fixed rule makes runs
repeatable, and it matters: see the tests).

CLI: `tiny-hf rag-eval --index DIR` (an index built by rag.index) or `tiny-hf rag-eval --data embedded
--max-docs 60` (builds a small index in memory, on a fixed pseudo-random sample of documents).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from tiny_hf.corpus import stable_fraction
from tiny_hf.metrics import DEFAULT_KS, ranking_metrics
from tiny_hf.options import parse_options

from .bm25 import top_k
from .chunking import Chunk

RETRIEVERS = ("bm25", "dense", "hybrid", "bm25s", "st")
RETRIEVER_NAMES = {
    "bm25": "BM25 lucene (ours)",
    "dense": "dense MiniLM (ours)",
    "hybrid": "hybrid RRF (ours)",
    "bm25s": "bm25s lucene (peer)",
    "st": "sentence-transformers semantic_search (peer)",
}

# ---- query construction ----
SYNONYMS = {
    "return": "give back",
    "returns": "gives back",
    "returned": "given back",
    "create": "build",
    "creates": "builds",
    "construct": "build",
    "constructs": "builds",
    "get": "fetch",
    "gets": "fetches",
    "set": "assign",
    "sets": "assigns",
    "remove": "delete",
    "removes": "deletes",
    "delete": "remove",
    "deletes": "removes",
    "check": "test",
    "checks": "tests",
    "determine": "work out",
    "compute": "calculate",
    "computes": "calculates",
    "calculate": "compute",
    "convert": "turn",
    "converts": "turns",
    "serialize": "convert",
    "initialize": "set up",
    "initialise": "set up",
    "specified": "given",
    "string": "text",
    "strings": "texts",
    "str": "text",
    "dictionary": "mapping",
    "dict": "mapping",
    "list": "sequence",
    "exception": "error",
    "raise": "throw",
    "raises": "throws",
    "raised": "thrown",
    "method": "routine",
    "function": "routine",
    "new": "fresh",
    "whether": "if",
    "contains": "holds",
    "contain": "hold",
    "use": "employ",
    "used": "employed",
    "start": "begin",
    "starts": "begins",
    "stop": "halt",
    "print": "display",
    "find": "locate",
    "finds": "locates",
    "append": "add",
    "insert": "put",
    "update": "refresh",
    "parse": "analyse",
    "parses": "analyses",
    "argument": "parameter",
    "arguments": "parameters",
    "object": "value",
    "objects": "values",
    "instance": "object",
    "specify": "give",
    "called": "invoked",
    "call": "invoke",
    "calls": "invokes",
    "evaluated": "computed",
    "statement": "instruction",
    "character": "symbol",
    "characters": "symbols",
}
# Docstring summaries that start with one of these are imperative ("Return ...", "Serialize ...").
IMPERATIVES = frozenset(
    "return create construct get set remove delete check determine compute calculate convert serialize deserialize "
    "initialize initialise make build read write send open close start stop add append insert update parse format "
    "encode decode load save find search test run execute call print register reset clear copy move rename wait "
    "apply handle process generate emit flush split join compare raise mark release acquire".split()
)
_ARTICLES = frozenset({"a", "an", "the"})
MAX_QUERY_WORDS = 16
_MARKUP = [
    (re.compile(r":[\w:.-]+:`~?([^`]*)`"), r"\1"),  # :func:`x`
    (re.compile(r"``([^`]*)``"), r"\1"),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"\*{1,2}([^*]+)\*{1,2}"), r"\1"),
]
_PARENS = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")
_WORD = re.compile(r"[\w'.-]*\w|[^\w\s]")
# A docstring part of a stdlib document: "module.name(args)" or "class module.Name(bases)", then the docstring.
_QUALNAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+"
_HEADING = re.compile(
    rf"^(?:(?P<cls>class )(?P<cqual>{_QUALNAME})(?:\(.*\))?|(?P<qual>{_QUALNAME})\(.*\))[ \t]*\n(?=\S)", re.MULTILINE
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class Query:
    """One held-out query.

    Args:
        qid: a stable id, "<doc_id>@<char offset>".
        text: the rewritten question.
        relevant: chunk index -> relevance grade (one chunk, grade 1, by construction).
        doc_id: the document the sentence comes from.
        start: character offset of the sentence in the document.
        end: one past its last character.
        source: "docstring" or "topic".
        sentence: the sentence as it stands in the chunk.
        answer: the qualified name for a docstring (`json.dumps`), the sentence for a topic.
    """

    qid: str
    text: str
    relevant: dict[int, int]
    doc_id: str
    start: int
    end: int
    source: str
    sentence: str
    answer: str

    def to_dict(self) -> dict:
        return asdict(self)


def _template_variant(qid: str) -> int:
    """0 or 1, the question template of an imperative docstring: the low bit of the sha256 that `stable_fraction`
    reads (its float drops that bit). Kept as it was so the query set, and the committed results, do not change."""
    return hashlib.sha256(qid.encode()).digest()[7] & 1


def _first_sentence(text: str) -> str | None:
    """The first sentence of a paragraph (up to and with its end mark), or None if the paragraph has none."""
    m = _SENTENCE_END.search(text)
    return text[: m.end()] if m else None


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def rewrite_query(sentence: str, *, source: str, qualname: str = "", kind: str = "function", variant: int = 0) -> str:
    """Turn a sentence into a question by the rules of the module docstring (deterministic).

    Args:
        sentence: the source sentence.
        source: "docstring" or "topic".
        qualname: the documented object's qualified name (docstrings): its parts are removed.
        kind: "function", "method" or "class": the noun of the question.
        variant: picks one of the two templates of an imperative docstring (0 or 1).
    """
    text = sentence
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    text = _PARENS.sub(" ", text)
    text = re.split(r"[:;]\s", text + " ", maxsplit=1)[0]
    text = text.strip().rstrip(".!?").strip()
    names = {p.lower() for p in qualname.split(".") if p} | {"self"}
    words = []
    for raw in text.split():
        word = raw.strip(",.'\"")
        low = word.lower()
        if not word or low in names or low in _ARTICLES:
            continue
        words.append(SYNONYMS.get(low, word if word.isupper() or not word[:1].isupper() else low))
    words = " ".join(words).split()[:MAX_QUERY_WORDS]
    if not words:
        return ""
    if source == "topic":
        return f"where is it explained that {' '.join(words)}?"
    first = sentence.split()[0].strip("`*,.").lower()
    if first in IMPERATIVES:
        if variant == 0:
            return f"how do I {' '.join(words)}?"
        # the verb may have become two words ("give back"): conjugating the first is enough ("gives back")
        return f"which {kind} {_third_person(words[0])} {' '.join(words[1:])}".rstrip() + "?"
    return f"which {kind} is this: {' '.join(words)}?"


def _candidates(chunk: Chunk) -> list[dict]:
    """Candidate sentences of one chunk: (doc offset span, sentence, source, qualified name, kind)."""
    out = []
    text = chunk.text
    if chunk.doc_id.startswith("stdlib/"):
        for m in _HEADING.finditer(text):
            para_start = m.end()
            para_end = text.find("\n\n", para_start)
            para = text[para_start : para_end if para_end >= 0 else len(text)]
            sentence = _first_sentence(para)
            if not sentence:
                continue
            qual = m.group("qual") or m.group("cqual")
            parts = qual.split(".")
            kind = (
                "class" if m.group("cls") else ("method" if len(parts) > 2 and parts[-2][:1].isupper() else "function")
            )
            out.append(dict(offset=para_start, sentence=sentence, source="docstring", qualname=qual, kind=kind))
    elif chunk.doc_id.startswith("topic/"):
        pos = 0
        for para in re.split(r"\n[ \t]*\n", text):
            start = text.find(para, pos)
            pos = start + len(para)
            lines = para.split("\n")
            if not para or para[0].isspace() or any(re.fullmatch(r"([*=\-~^\"#+])\1{2,}", ln.strip()) for ln in lines):
                continue
            if para.lstrip().startswith((">>>", "...", "*", "-", "|")):
                continue
            sentence = _first_sentence(para)
            if sentence:
                out.append(dict(offset=start, sentence=sentence, source="topic", qualname="", kind="topic"))
    for c in out:
        c["start"] = chunk.start + c["offset"]
        c["end"] = c["start"] + len(c["sentence"])
    return out


def build_queries(chunks: Sequence[Chunk], *, n: int = 300, per_doc: int = 2) -> list[Query]:
    """The held-out query set of a chunked corpus (see the module docstring for the rules).

    Args:
        chunks: the index's chunks (`RagIndex.chunks`), in index order: the qrels refer to these positions.
        n: queries wanted at most.
        per_doc: queries per document at most (so a few long modules do not dominate).

    Returns:
        Up to n queries, ordered by their stable hash.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    by_doc: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_doc.setdefault(c.doc_id, []).append(i)
    cands = {}
    for i, c in enumerate(chunks):
        for cand in _candidates(c):
            n_words = len(cand["sentence"].split())
            if not 6 <= n_words <= 40:
                continue
            key = (c.doc_id, cand["start"])
            containing = [
                j for j in by_doc[c.doc_id] if chunks[j].start <= cand["start"] and cand["end"] <= chunks[j].end
            ]
            if len(containing) != 1:
                continue  # in the overlap of two chunks: two relevant passages; leave it out
            cands[key] = {**cand, "doc_id": c.doc_id, "chunk": i}
    counts = Counter(" ".join(c["sentence"].split()).lower() for c in cands.values())
    queries, per = [], Counter()
    for (doc_id, start), c in sorted(cands.items(), key=lambda kv: stable_fraction(f"{kv[0][0]}@{kv[0][1]}")):
        if counts[" ".join(c["sentence"].split()).lower()] > 1 or per[doc_id] >= per_doc:
            continue
        qid = f"{doc_id}@{start}"
        sentence = " ".join(c["sentence"].split())
        text = rewrite_query(
            sentence, source=c["source"], qualname=c["qualname"], kind=c["kind"], variant=_template_variant(qid)
        )
        if len(text.split()) < 4:
            continue
        answer = c["qualname"] if c["source"] == "docstring" else sentence
        queries.append(Query(qid, text, {c["chunk"]: 1}, doc_id, start, c["end"], c["source"], sentence, answer))
        per[doc_id] += 1
        if len(queries) == n:
            break
    return queries


# ---- metrics (BEIR / pytrec_eval definitions) ----
def rank_by_score(scores: Sequence[float] | np.ndarray, k: int) -> list[int]:
    """Indices of the k best scores, best first; equal scores go to the lower index (our tie rule)."""
    return top_k(np.asarray(scores, dtype=np.float64), k)[0].tolist()


def mean_metrics(
    rankings: Sequence[Sequence[int]], queries: Sequence[Query], *, ks: Sequence[int] = DEFAULT_KS
) -> dict:
    """Metrics averaged over queries (rankings[i] answers queries[i])."""
    if len(rankings) != len(queries):
        raise ValueError(f"{len(rankings)} rankings for {len(queries)} queries")
    if not queries:
        raise ValueError("no queries to evaluate")
    per_query = [ranking_metrics(r, q.relevant, ks=ks) for r, q in zip(rankings, queries, strict=True)]
    return {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]}


# ---- retrievers: each maps the query texts to rankings of chunk indices, best first ----
def _ours(mode: str) -> Callable:
    def run(index, texts: list[str], k: int) -> list[list[int]]:
        return [[h.chunk_index for h in index.search(t, k=k, mode=mode)] for t in texts]

    return run


def _bm25s(index, texts: list[str], k: int) -> list[list[int]]:
    """bm25s with the same method, parameters and tokens (our analyzer's), so only the implementation differs."""
    import bm25s

    ours = index.bm25
    retriever = bm25s.BM25(method=ours.method, k1=ours.k1, b=ours.b, delta=ours.delta)
    retriever.index([ours.analyzer(c.text) for c in index.chunks], show_progress=False)
    tokens = [ours.analyzer(t) for t in texts]
    rankings = []
    for toks in tokens:
        toks = [t for t in toks if t in retriever.vocab_dict] or ["\x00"]  # bm25s rejects queries of unknown words
        if toks == ["\x00"]:
            rankings.append([])
            continue
        docs, scores = retriever.retrieve([toks], k=min(k, len(index.chunks)), show_progress=False)
        pairs = sorted(zip(docs[0].tolist(), scores[0].tolist(), strict=True), key=lambda p: (-p[1], p[0]))
        rankings.append([d for d, s in pairs if s > 0])  # like ours: a chunk sharing no word is no hit
    return rankings


def _st(index, texts: list[str], k: int) -> list[list[int]]:
    """sentence-transformers: its own query embeddings, `util.semantic_search` over the index's chunk vectors (which
    equal SentenceTransformer.encode of the chunks; tests/test_rag.py checks it), so the chunks are not embedded
    twice."""
    from sentence_transformers import SentenceTransformer, util

    model = SentenceTransformer(index.encoder.name, device="cpu")
    q = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    hits = util.semantic_search(q, index.vectors.vectors(), top_k=min(k, len(index.chunks)))
    return [[h["corpus_id"] for h in sorted(row, key=lambda h: (-h["score"], h["corpus_id"]))] for row in hits]


RETRIEVER_FNS: dict[str, Callable] = {
    "bm25": _ours("bm25"),
    "dense": _ours("dense"),
    "hybrid": _ours("hybrid"),
    "bm25s": _bm25s,
    "st": _st,
}


def evaluate_index(
    index,
    queries: Sequence[Query],
    *,
    retrievers: Sequence[str] = RETRIEVERS,
    k: int = 10,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, dict]:
    """Run each retriever over the queries and average the metrics.

    Returns:
        retriever key -> {metric: value, ..., "seconds": wall time of the queries, "queries_per_s": ...}.
    """
    if len(index) == 0:
        raise ValueError("the index is empty: add documents before evaluating")
    if k < max(max(ks), 10):
        raise ValueError(f"k={k} must be >= max(ks)={max(ks)} and >= 10 (MRR@10, nDCG@10)")
    if unknown := [r for r in retrievers if r not in RETRIEVER_FNS]:
        raise ValueError(f"retrievers {unknown} are not among {list(RETRIEVER_FNS)}")
    texts = [q.text for q in queries]
    results = {}
    for name in retrievers:
        t0 = time.perf_counter()
        rankings = RETRIEVER_FNS[name](index, texts, k)
        seconds = time.perf_counter() - t0
        results[name] = {
            **mean_metrics(rankings, queries, ks=ks),
            "seconds": seconds,
            "queries_per_s": len(texts) / seconds,
        }
    return results


def format_table(results: dict[str, dict], *, ks: Sequence[int] = DEFAULT_KS) -> str:
    """A markdown table of evaluate_index's results."""
    cols = [f"recall@{k}" for k in ks] + ["mrr@10", "ndcg@10"]
    lines = ["| retriever | " + " | ".join(cols) + " | queries/s |", "|---" * (len(cols) + 2) + "|"]
    for name, m in results.items():
        cells = " | ".join(f"{m[c]:.3f}" for c in cols)
        lines.append(f"| {RETRIEVER_NAMES.get(name, name)} | {cells} | {m['queries_per_s']:.1f} |")
    return "\n".join(lines)


@dataclass
class EvaluateOptions:
    # ---- index (load one, or build a small one in memory) ----
    index: str | None = field(default=None, metadata={"help": "an index folder written by `tiny-hf index`"})
    data: str = field(default="embedded", metadata={"help": "without --index: 'embedded', 'topics', a file or folder"})
    max_docs: int = field(default=60, metadata={"help": "without --index: a fixed sample of N documents (0: all)"})
    chunk_size: int = field(default=200, metadata={"help": "without --index: tokens per chunk"})
    overlap: int = field(default=32, metadata={"help": "without --index: tokens shared by neighbours"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (the encoder)"})
    # ---- queries ----
    queries: int = field(default=300, metadata={"help": "queries at most"})
    per_doc: int = field(default=2, metadata={"help": "queries per document at most"})
    dump_queries: str | None = field(default=None, metadata={"help": "write the query set here as JSON lines"})
    # ---- retrievers and output ----
    retrievers: list[str] = field(
        default_factory=lambda: list(RETRIEVERS), metadata={"help": "retrievers to run", "choices": list(RETRIEVERS)}
    )
    json: bool = field(default=False, metadata={"help": "print the results as JSON"})


def _evaluated_index(options: EvaluateOptions):
    """The index of --index, or one built in memory from a fixed sample of --data."""
    from .dense import Encoder
    from .index import RagIndex, load_documents, load_rag_index

    if options.index:
        encoder = Encoder(device=options.device) if options.device != "cpu" else None
        return load_rag_index(options.index, flag="--index", encoder=encoder)
    from tqdm.auto import tqdm

    docs = load_documents(options.data, max_docs=options.max_docs or None)
    index = RagIndex(Encoder(device=options.device), chunk_size=options.chunk_size, overlap=options.overlap)
    index.add(docs, progress=lambda b: tqdm(b, desc="embedding", unit="batch", disable=not sys.stderr.isatty()))
    return index


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse_options(EvaluateOptions, argv=argv, description=__doc__)
    index = _evaluated_index(options)
    queries = build_queries(index.chunks, n=options.queries, per_doc=options.per_doc)
    if not queries:
        raise SystemExit(
            f"error: no query could be built from the {len(index)} chunks (too few docstrings or topics?)"
        )
    if options.dump_queries:
        with open(options.dump_queries, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(q.to_dict(), ensure_ascii=False) + "\n" for q in queries)
    results = evaluate_index(index, queries, retrievers=options.retrievers)
    summary = {"chunks": len(index), "documents": len(index.doc_ids), "queries": len(queries), "results": results}
    if options.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{len(queries)} queries over {len(index)} chunks of {len(index.doc_ids)} documents\n")
        print(format_table(results))
    return summary


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
