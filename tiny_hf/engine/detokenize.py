"""Streaming text: token ids to text a few tokens at a time, and stop strings found in it.

Decoding the whole output every step costs O(length) per token; TGI and vLLM decode only the last few tokens and
take the new characters once they no longer end in a half-finished UTF-8 sequence (shown as U+FFFD). Text that could
still become the start of a stop string is held back from the stream.
"""

from __future__ import annotations

from .sequence import Request


def decode_new_text(tokenizer, request: Request, final: bool) -> str:
    """The request's output text so far, extended by its newest tokens (`request.text` is updated)."""
    if tokenizer is None:
        return ""
    ids = request.output_ids
    prefix = tokenizer.decode(ids[request.prefix_offset : request.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[request.prefix_offset :], skip_special_tokens=True)
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        request.text += full[len(prefix) :]
        request.prefix_offset, request.read_offset = request.read_offset, len(ids)
    return request.text


def find_stop(request: Request, text: str) -> int | None:
    """Where the first stop string starts in `text` (searching only what could be new), or None."""
    hits = [text.find(s, max(0, request.sent - len(s))) for s in request.params.stop]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def safe_delta(request: Request, text: str) -> str:
    """The text not streamed yet, minus a tail that could still grow into a stop string (`request.sent` moves on)."""
    safe = len(text) - max((len(s) - 1 for s in request.params.stop), default=0)
    delta = text[request.sent : max(safe, request.sent)]
    request.sent += len(delta)
    return delta
