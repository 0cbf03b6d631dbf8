"""Token-aware chunking: split documents into pieces that fit an encoder's window, cutting where the text breaks.

A retriever scores chunks, not whole documents: an encoder only sees its first `max_length` tokens (256 for
all-MiniLM-L6-v2), and BM25 favours short passages about one thing. So every chunk holds at most `chunk_size` tokens
of the tokenizer the encoder uses (any Hugging Face fast tokenizer: the offsets it returns map tokens back to
characters), and consecutive chunks of a long passage share up to `overlap` tokens (the shared part starts at a
word) so a sentence cut in two is whole in one of them.

Where to cut, best first: before a heading (a Markdown `# title`, or a title line underlined with `*`, `=`, `-`, `~`,
`^`, as in the pydoc topics and reStructuredText) or at a blank line (paragraph break); then at a line break; then
after a sentence end; then between words; only a single unbroken run of text longer than the window is cut
mid-word. Among the candidates of the best kind in the second half of the window, the last one wins, so chunks are
at least half full (unless the document ends).

Every chunk keeps its document's id and the character offsets `start`/`end` with `text == document[start:end]`, so
a hit can be shown in context or highlighted; the chunk never starts or ends in whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

# A heading: a Markdown "# title" line, or a title line followed by an underline of one repeated punctuation mark.
_MARKDOWN_HEADING = re.compile(r"^#{1,6}[ \t]+\S[^\n]*$", re.MULTILINE)
_UNDERLINED_HEADING = re.compile(r"^(?=[^\n]*\S)[^\n]+\n([*=\-~^\"#+])\1{2,}[ \t]*$", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")  # a blank line (and whatever whitespace follows it)
_LINE_BREAK = re.compile(r"\n\s*")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_WHITESPACE = re.compile(r"\s+")
# Cut kinds, best first; each yields the character positions where a new chunk may start.
_BOUNDARY_KINDS = ("section", "line", "sentence", "word")


@dataclass
class Chunk:
    """A piece of one document.

    Args:
        doc_id: the id of the document it comes from.
        text: the chunk's text, `document[start:end]`.
        start: character offset of the first character in the document.
        end: character offset one past the last character.
        n_tokens: how many tokenizer tokens (without special tokens) it spans in the document's tokenization.
        metadata: the document's other fields (e.g. "source"), shared by all its chunks; used by filters.
    """

    doc_id: str
    text: str
    start: int
    end: int
    n_tokens: int
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _boundary_chars(text: str) -> dict[str, np.ndarray]:
    """Character positions where a chunk may start, per kind (p means: cut between text[p-1] and text[p])."""
    headings = [*_MARKDOWN_HEADING.finditer(text), *_UNDERLINED_HEADING.finditer(text)]
    heading_ends = {m.end() for m in headings}
    # A heading belongs to the text under it: the blank line right after a heading is no place to cut.
    section = {m.end() for m in _PARAGRAPH_BREAK.finditer(text) if m.start() not in heading_ends}
    section |= {m.start() for m in headings}
    kinds = {
        "section": section,
        "line": {m.end() for m in _LINE_BREAK.finditer(text)},
        "sentence": {m.end() for m in _SENTENCE_END.finditer(text)},
        "word": {m.end() for m in _WHITESPACE.finditer(text)},
    }
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in kinds.items()}


def _boundary_tokens(boundaries: np.ndarray, token_starts: np.ndarray) -> np.ndarray:
    """Token indices j such that a cut before token j falls on one of these character boundaries.

    Token j starts a new piece at boundary p when token j-1 starts before p and token j starts at or after it (word
    piece tokenizers skip whitespace, byte-level BPE puts the space at the front of the next token: both work).
    """
    j = np.searchsorted(token_starts, boundaries, side="left")
    return np.unique(j[(j > 0) & (j < len(token_starts))])


def _cut_points(n: int, cuts: dict[str, np.ndarray], size: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [s, e) covering 0..n, each at most `size` long, consecutive ones sharing up to `overlap` tokens."""
    spans, s = [], 0
    while True:
        if n - s <= size:
            spans.append((s, n))
            return spans
        # The cut must let the next chunk start after this one (e - overlap > s), and fill this one at least half.
        lo, hi = s + max(overlap + 1, size // 2), s + size
        e = hi  # no boundary at all: cut mid-word at the window's end
        for kind in _BOUNDARY_KINDS:
            c = cuts[kind]
            inside = c[(c >= lo) & (c <= hi)]
            if len(inside):
                e = int(inside[-1])
                break
        spans.append((s, e))
        # The next chunk starts `overlap` tokens back, moved forward to the first word start (so it holds no half
        # word); the overlap shrinks by those few tokens.
        words = cuts["word"]
        later = words[(words >= e - overlap) & (words <= e)] if overlap else words[:0]
        s = int(later[0]) if len(later) else e - overlap


def chunk_text(
    text: str,
    tokenizer,
    *,
    chunk_size: int = 200,
    overlap: int = 32,
    doc_id: str = "0",
    metadata: dict | None = None,
) -> list[Chunk]:
    """Split one document into chunks of at most `chunk_size` tokens (see the module docstring).

    Args:
        text: the document.
        tokenizer: a Hugging Face fast tokenizer (it must return offsets).
        chunk_size: most tokens per chunk, special tokens not counted (keep it at or below the encoder window minus
            its special tokens: 254 for all-MiniLM-L6-v2).
        overlap: tokens shared by consecutive chunks cut from one passage; must be below `chunk_size`.
        doc_id: the id stored in each chunk.
        metadata: stored in each chunk (copied).

    Returns:
        The chunks in document order; none for a document without tokens.
    """
    _check_sizes(chunk_size, overlap)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"chunking needs a fast tokenizer (offsets); got {type(tokenizer).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = np.array(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (n_tokens, 2) character spans
    if len(offsets) == 0:
        return []
    starts = offsets[:, 0]
    cuts = {k: _boundary_tokens(b, starts) for k, b in _boundary_chars(text).items()}
    chunks = []
    for s, e in _cut_points(len(offsets), cuts, chunk_size, overlap):
        start, end = int(offsets[s:e, 0].min()), int(offsets[s:e, 1].max())
        piece = text[start:end]
        # Trim whitespace that byte-level tokens carry at their front, so the offsets point at the words themselves.
        start += len(piece) - len(piece.lstrip())
        end -= len(piece) - len(piece.rstrip())
        if end <= start:
            continue  # a span of whitespace-only tokens
        chunks.append(Chunk(doc_id, text[start:end], start, end, e - s, dict(metadata or {})))
    return chunks


def chunk_documents(
    documents: Iterable[dict | str],
    tokenizer,
    *,
    chunk_size: int = 200,
    overlap: int = 32,
) -> list[Chunk]:
    """Chunk a corpus: dicts with "text" and an optional "id" (other fields become chunk metadata), or plain strings
    (ids "0", "1", ...).

    Raises:
        ValueError: for an empty corpus, a corpus without any text, repeated ids, or bad sizes.
    """
    _check_sizes(chunk_size, overlap)
    docs = normalize_documents(documents)
    chunks = []
    for doc in docs:
        meta = {k: v for k, v in doc.items() if k not in ("id", "text")}
        chunks += chunk_text(
            doc["text"], tokenizer, chunk_size=chunk_size, overlap=overlap, doc_id=doc["id"], metadata=meta
        )
    if not chunks:
        raise ValueError(f"the corpus of {len(docs)} document(s) has no text to chunk")
    return chunks


def normalize_documents(documents: Iterable[dict | str]) -> list[dict]:
    """Documents as dicts with a string "id" and "text"; raises ValueError for none, a missing text or repeated ids."""
    docs = []
    for i, doc in enumerate(documents):
        doc = {"id": str(i), "text": doc} if isinstance(doc, str) else dict(doc)
        if not isinstance(doc.get("text"), str):
            raise ValueError(f"document {i} has no 'text' string: keys {sorted(doc)}")
        doc["id"] = str(doc.get("id", i))
        docs.append(doc)
    if not docs:
        raise ValueError("the corpus is empty: no documents to chunk")
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"document ids must be unique; repeated: {repeated}")
    return docs


def _check_sizes(chunk_size: int, overlap: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
    if not 0 <= overlap < chunk_size:
        raise ValueError(f"overlap={overlap} must be in [0, chunk_size={chunk_size})")
