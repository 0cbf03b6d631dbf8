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

Two more kinds, where the question's words differ from the passage's (`QUERY_KINDS`; each drawn as its own set of up
to n, with a hash of its own, so asking for them leaves the docstring and topic queries as they were):

- paraphrase: the same docstring summaries, rewritten by `paraphrase_query`: the heading's argument names become
  "the given value", ~130 frequent docstring terms become a description (`DESCRIPTIONS`: `str` -> "piece of text",
  `json` -> "data interchange notation", `socket` -> "network endpoint"), other identifiers go, then the synonyms;
- held_out: `hold_out_summaries` removes the summary sentence of some docstrings from the documents before they are
  indexed; the question is that summary (rewritten as a docstring query), the relevant chunk the one that holds the
  object's heading and the first paragraph left of its docstring: the other part of the doc, not the words asked.

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
# The paraphrase kind's descriptions: a frequent docstring term (in the corpus's summaries, ranked by count) -> words
# that describe it without it. Only terms with an unambiguous, plain description; applied before SYNONYMS.
DESCRIPTIONS = {
    "file": "document on disk",
    "files": "documents on disk",
    "filename": "document's label on disk",
    "string": "piece of text",
    "strings": "pieces of text",
    "str": "piece of text",
    "list": "ordered collection",
    "path": "location in the filesystem",
    "name": "label",
    "names": "labels",
    "widget": "on-screen control",
    "data": "information",
    "message": "note",
    "messages": "notes",
    "command": "instruction",
    "line": "row of text",
    "lines": "rows of text",
    "bytes": "raw octets",
    "byte": "raw octet",
    "number": "count",
    "module": "library unit",
    "modules": "library units",
    "type": "kind",
    "event": "occurrence",
    "events": "occurrences",
    "header": "leading field",
    "headers": "leading fields",
    "text": "prose",
    "item": "entry",
    "items": "entries",
    "format": "layout",
    "index": "position number",
    "time": "clock reading",
    "server": "service host",
    "tuple": "fixed group",
    "tuples": "fixed groups",
    "exception": "failure",
    "node": "vertex",
    "code": "program text",
    "address": "network location",
    "default": "fallback",
    "stream": "flow of data",
    "option": "setting",
    "options": "settings",
    "version": "release number",
    "directory": "folder",
    "directories": "folders",
    "sequence": "series",
    "loop": "cycle",
    "handler": "callback routine",
    "process": "running program",
    "element": "member",
    "elements": "members",
    "window": "screen pane",
    "socket": "network endpoint",
    "parent": "enclosing owner",
    "tree": "hierarchy",
    "request": "query",
    "package": "bundle",
    "mailbox": "mail store",
    "error": "failure",
    "key": "lookup handle",
    "keys": "lookup handles",
    "integer": "whole number",
    "int": "whole number",
    "float": "real number",
    "document": "page",
    "dictionary": "lookup table",
    "dict": "lookup table",
    "mapping": "lookup table",
    "size": "extent",
    "log": "journal",
    "logger": "journal writer",
    "queue": "waiting line",
    "thread": "concurrent worker",
    "pattern": "template",
    "output": "produced result",
    "input": "incoming result",
    "buffer": "holding area",
    "archive": "bundle of packed members",
    "url": "web address",
    "connection": "link",
    "encoding": "character mapping",
    "iterator": "stream of entries",
    "character": "symbol",
    "characters": "symbols",
    "response": "reply",
    "binary": "raw",
    "canvas": "drawing area",
    "tag": "marker",
    "parser": "reader",
    "argument": "parameter",
    "arguments": "parameters",
    "args": "parameters",
    "host": "machine",
    "protocol": "convention",
    "attribute": "property",
    "attributes": "properties",
    "mime": "media type",
    "http": "web",
    "html": "web page markup",
    "xml": "markup",
    "json": "data interchange notation",
    "coroutine": "async routine",
    "generator": "lazy producer",
    "date": "calendar day",
    "image": "picture",
    "callable": "invocable thing",
    "callback": "hook",
    "lock": "mutex",
    "email": "mail",
    "datetime": "timestamp",
    "os": "operating system",
    "sys": "interpreter",
    "python": "the language",
    "variable": "named slot",
    "frame": "execution record",
    "class": "kind of value",
    "subclass": "derived kind",
    "instance": "one value",
    "instances": "values",
    "decimal": "base-ten",
    "expression": "formula",
    "platform": "environment",
    "signal": "notification",
}
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
# A word that is code, not English: an underscore, a digit, an inner capital or an inner dot (`max_size`, `SAX2`).
_IDENTIFIER = re.compile(r"_|\d|[a-z][A-Z]|\w\.\w")
MAX_PARAPHRASE_WORDS = 20
# The kinds of query: docstring and topic (drawn together, as one set), paraphrase and held_out (one set each).
QUERY_KINDS = ("docstring", "topic", "paraphrase", "held_out")


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


def _plain(sentence: str) -> str:
    """Rule 1: markup out, text in parentheses and after the first ":" or ";" dropped, no end mark."""
    text = sentence
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    text = _PARENS.sub(" ", text)
    text = re.split(r"[:;]\s", text + " ", maxsplit=1)[0]
    return text.strip().rstrip(".!?").strip()


def rewrite_query(sentence: str, *, source: str, qualname: str = "", kind: str = "function", variant: int = 0) -> str:
    """Turn a sentence into a question by the rules of the module docstring (deterministic).

    Args:
        sentence: the source sentence.
        source: "docstring" or "topic".
        qualname: the documented object's qualified name (docstrings): its parts are removed.
        kind: "function", "method" or "class": the noun of the question.
        variant: picks one of the two templates of an imperative docstring (0 or 1).
    """
    text = _plain(sentence)
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


def paraphrase_query(
    sentence: str, *, qualname: str = "", kind: str = "function", args: Sequence[str] = (), variant: int = 0
) -> str:
    """A docstring summary as a question in other words (the "paraphrase" kind; deterministic).

    After rule 1 and the name's removal (as `rewrite_query`): an argument of the heading becomes "the given value";
    a term of `DESCRIPTIONS` becomes its description (`json` -> "data interchange notation", `str` -> "piece of
    text"); another identifier (`getEvent`, `SAX2`, `max_size`: an underscore, a digit or an inner capital) is dropped;
    other words go through `SYNONYMS`. At most 20 words, then a template of its own: "is there a way to ...?" / "what
    should I use to ...?" for an imperative summary, "what <kind> fits this description: ...?" for another.

    Args:
        sentence: the docstring's first sentence.
        qualname: the documented object's qualified name: its parts are removed.
        kind: "function", "method" or "class".
        args: the argument names of the heading `name(args)`.
        variant: picks one of the two templates of an imperative summary (0 or 1).
    """
    names = {p.lower() for p in qualname.split(".") if p} | {"self"}
    arg_names = {a.lower() for a in args} - names
    first = sentence.split()[0].strip("`*,.").lower() if sentence.split() else ""
    imperative = first in IMPERATIVES
    words = []
    for i, raw in enumerate(_plain(sentence).split()):
        word = raw.strip(",.'\"")
        low = word.lower()
        if not word or low in names or low in _ARTICLES:
            continue
        if low in arg_names:
            words.append("the given value")
        elif low in DESCRIPTIONS and not (i == 0 and imperative):
            words.append(DESCRIPTIONS[low])
        elif not _IDENTIFIER.search(word):
            words.append(SYNONYMS.get(low, low))
    words = " ".join(words).split()[:MAX_PARAPHRASE_WORDS]
    if not words:
        return ""
    if imperative:
        return f"{'is there a way to' if variant == 0 else 'what should I use to'} {' '.join(words)}?"
    return f"what {kind} fits this description: {' '.join(words)}?"


def _arg_names(heading: str) -> list[str]:
    """The parameter names of a `name(args)` heading line (none for a class heading)."""
    if heading.startswith("class ") or "(" not in heading:
        return []
    inner = heading[heading.index("(") + 1 : heading.rindex(")")] if ")" in heading else ""
    names = [re.split(r"[=:]", part.strip().lstrip("*"), maxsplit=1)[0].strip() for part in inner.split(",")]
    return [n for n in names if n.isidentifier()]


def _heading_kind(m: re.Match) -> tuple[str, str]:
    """(qualified name, "class" / "method" / "function") of a docstring heading match."""
    qual = m.group("qual") or m.group("cqual")
    parts = qual.split(".")
    kind = "class" if m.group("cls") else ("method" if len(parts) > 2 and parts[-2][:1].isupper() else "function")
    return qual, kind


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
            qual, kind = _heading_kind(m)
            args = _arg_names(m.group(0).strip())
            out.append(
                dict(offset=para_start, sentence=sentence, source="docstring", qualname=qual, kind=kind, args=args)
            )
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
                out.append(dict(offset=start, sentence=sentence, source="topic", qualname="", kind="topic", args=[]))
    for c in out:
        c["start"] = chunk.start + c["offset"]
        c["end"] = c["start"] + len(c["sentence"])
    return out


@dataclass
class HeldOut:
    """A docstring summary removed from the indexed text (the "held_out" kind).

    Args:
        doc_id: the document.
        qualname: the documented object's qualified name.
        kind: "function", "method" or "class".
        sentence: the removed summary (the question is made from it).
        start: offset of the object's heading in the document as indexed (after the removals).
        rest: offset where what is left of its docstring begins (where the summary was).
        end: one past the end of the first paragraph left (at most `HELD_OUT_SPAN` characters after the heading):
            the relevant passage is the one chunk holding [start, end).
    """

    doc_id: str
    qualname: str
    kind: str
    sentence: str
    start: int
    rest: int
    end: int


HELD_OUT_SPAN = 400


def hold_out_summaries(
    docs: Sequence[dict], *, fraction: float = 0.5, min_rest_words: int = 8
) -> tuple[list[dict], list[HeldOut]]:
    """Remove the summary sentence of some docstrings from the documents, before indexing: the "held_out" kind asks
    for those objects in their summaries' words, and only their headings and the rest of their docstrings (other
    sentences, other paragraphs) can be found.

    Held out: a `stdlib/` docstring whose first sentence has 6 to 40 words and occurs once in all `docs`, followed
    by at least `min_rest_words` words of the same docstring, picked when a hash of (doc id, offset) is below
    `fraction` (so the other kinds keep the rest).

    Args:
        docs: documents ({"id", "text", ...}).
        fraction: share of the eligible docstrings held out.
        min_rest_words: words the docstring must keep after its summary (the text left to find it by).

    Returns:
        The documents with the summaries removed (the others unchanged) and one `HeldOut` per removal.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} is not between 0 and 1")
    everything = "\x00".join(d["text"] for d in docs)
    out_docs, held = [], []
    for doc in docs:
        doc_id, text = str(doc["id"]), doc["text"]
        if not doc_id.startswith("stdlib/"):
            out_docs.append(doc)
            continue
        matches = list(_HEADING.finditer(text))
        parts, length, pos = [], 0, 0
        for i, m in enumerate(matches):
            para_start = m.end()
            block_end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            para_end = text.find("\n\n", para_start, block_end)
            sentence = _first_sentence(text[para_start : para_end if para_end >= 0 else block_end])
            if not sentence or not 6 <= len(sentence.split()) <= 40:
                continue
            rest_start = para_start + len(sentence)
            rest_start += len(text[rest_start:block_end]) - len(text[rest_start:block_end].lstrip())
            if len(text[rest_start:block_end].split()) < min_rest_words or everything.count(sentence) != 1:
                continue
            if stable_fraction(f"held_out:{doc_id}@{para_start}") >= fraction:
                continue
            qual, kind = _heading_kind(m)
            parts.append(text[pos:para_start])
            heading = length + (m.start() - pos)
            length += para_start - pos
            pos = rest_start
            first_end = text.find("\n\n", rest_start, block_end)
            span_end = min(first_end if first_end >= 0 else block_end, m.start() + HELD_OUT_SPAN + len(sentence))
            end = length + max(span_end - rest_start, 0)
            held.append(HeldOut(doc_id, qual, kind, " ".join(sentence.split()), heading, length, end))
        parts.append(text[pos:])
        out_docs.append({**doc, "text": "".join(parts)} if pos else doc)
    return out_docs, held


def _check_kinds(kinds: Sequence[str]) -> None:
    if isinstance(kinds, str):
        kinds = [kinds]
    if unknown := [k for k in kinds if k not in QUERY_KINDS]:
        raise ValueError(f"query kinds {unknown} are not among {list(QUERY_KINDS)}")
    if not kinds:
        raise ValueError(f"no query kind given; choose from {list(QUERY_KINDS)}")


def build_queries(
    chunks: Sequence[Chunk],
    *,
    n: int = 300,
    per_doc: int = 2,
    kinds: Sequence[str] = ("docstring", "topic"),
    held_out: Sequence[HeldOut] | None = None,
) -> list[Query]:
    """The held-out query set of a chunked corpus (see the module docstring for the rules).

    Args:
        chunks: the index's chunks (`RagIndex.chunks`), in index order: the qrels refer to these positions.
        n: queries wanted at most, for docstring and topic together, and for each other kind.
        per_doc: queries per document at most, per kind set (so a few long modules do not dominate).
        kinds: any of `QUERY_KINDS`.
        held_out: the removals of `hold_out_summaries` on the documents these chunks come from (needed by
            "held_out"; their objects are left out of the other kinds).

    Returns:
        Up to n queries of each kind set, each set ordered by its stable hash, in the order of `QUERY_KINDS`.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    _check_kinds(kinds)
    if "held_out" in kinds and held_out is None:
        raise ValueError("kind 'held_out' needs held_out=hold_out_summaries(docs)[1] of the indexed documents")
    held_out = list(held_out or [])
    by_doc: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_doc.setdefault(c.doc_id, []).append(i)

    def only_chunk(doc_id: str, start: int, end: int) -> int | None:
        containing = [j for j in by_doc.get(doc_id, []) if chunks[j].start <= start and end <= chunks[j].end]
        return containing[0] if len(containing) == 1 else None  # in the overlap of two chunks: leave it out

    held_rests = {(h.doc_id, h.rest) for h in held_out}
    cands = {}
    for i, c in enumerate(chunks):
        for cand in _candidates(c):
            n_words = len(cand["sentence"].split())
            if not 6 <= n_words <= 40 or (c.doc_id, cand["start"]) in held_rests:
                continue
            if only_chunk(c.doc_id, cand["start"], cand["end"]) is None:
                continue
            cands[(c.doc_id, cand["start"])] = {**cand, "doc_id": c.doc_id, "chunk": i}
    counts = Counter(" ".join(c["sentence"].split()).lower() for c in cands.values())
    unique = {key: c for key, c in cands.items() if counts[" ".join(c["sentence"].split()).lower()] == 1}

    def draw(items: dict, prefix: str, make) -> list[Query]:
        out, per = [], Counter()
        for (doc_id, start), item in sorted(
            items.items(), key=lambda kv: stable_fraction(f"{prefix}{kv[0][0]}@{kv[0][1]}")
        ):
            if per[doc_id] >= per_doc:
                continue
            query = make(f"{prefix}{doc_id}@{start}", item)
            if query is None or len(query.text.split()) < 4:
                continue
            out.append(query)
            per[doc_id] += 1
            if len(out) == n:
                break
        return out

    def original(qid: str, c: dict) -> Query:
        sentence = " ".join(c["sentence"].split())
        text = rewrite_query(
            sentence, source=c["source"], qualname=c["qualname"], kind=c["kind"], variant=_template_variant(qid)
        )
        answer = c["qualname"] if c["source"] == "docstring" else sentence
        return Query(
            qid, text, {c["chunk"]: 1}, c["doc_id"], c["offset_start"], c["end"], c["source"], sentence, answer
        )

    def paraphrase(qid: str, c: dict) -> Query:
        sentence = " ".join(c["sentence"].split())
        text = paraphrase_query(
            sentence, qualname=c["qualname"], kind=c["kind"], args=c["args"], variant=_template_variant(qid)
        )
        start = c["offset_start"]
        return Query(qid, text, {c["chunk"]: 1}, c["doc_id"], start, c["end"], "paraphrase", sentence, c["qualname"])

    def removed(qid: str, h: HeldOut) -> Query | None:
        chunk = only_chunk(h.doc_id, h.start, h.end)
        if chunk is None:
            return None
        text = rewrite_query(
            h.sentence, source="docstring", qualname=h.qualname, kind=h.kind, variant=_template_variant(qid)
        )
        return Query(qid, text, {chunk: 1}, h.doc_id, h.start, h.end, "held_out", h.sentence, h.qualname)

    for key, c in unique.items():
        c["offset_start"] = key[1]
    queries = []
    if {"docstring", "topic"} & set(kinds):
        queries += draw({k: c for k, c in unique.items() if c["source"] in kinds}, "", original)
    if "paraphrase" in kinds:
        queries += draw({k: c for k, c in unique.items() if c["source"] == "docstring"}, "paraphrase:", paraphrase)
    if "held_out" in kinds:
        queries += draw({(h.doc_id, h.start): h for h in held_out}, "held_out:", removed)
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
    per_query: bool = False,
) -> dict[str, dict]:
    """Run each retriever over the queries and average the metrics.

    Args:
        per_query: also return each query's metrics (for intervals and per-kind tables).

    Returns:
        retriever key -> {metric: value, ..., "seconds": wall time of the queries, "queries_per_s": ...}, and
        "per_query": [{metric: value} per query, in order] with per_query.
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
        if per_query:
            results[name]["per_query"] = [
                ranking_metrics(r, q.relevant, ks=ks) for r, q in zip(rankings, queries, strict=True)
            ]
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
