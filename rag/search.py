"""Search an index folder built by `rag.index`: BM25, dense, or hybrid (reciprocal rank fusion of both).

CLI: `tiny-hf search --index DIR "query" [--mode bm25|dense|hybrid] [-k 5] [--prefix topic/]
[--where source=pydoc_topics] [--json]`. BM25 searches never load the encoder; dense and hybrid ones load the encoder
recorded in the index (or `--encoder`) and refuse one that does not match it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tiny_hf.options import _read_config, build_parser

from .dense import Encoder
from .index import SEARCH_MODES, load_rag_index


def parse_with_positional(
    option_type: type, argv: list[str] | None, *, name: str, help: str, optional: bool = False, description: str
) -> tuple:
    """(options, value of the positional `name`), as `tiny_hf.options.parse_options` gives options (`--config`
    YAML included): its HfArgumentParser declares only --flags from a dataclass, so the positional is added here."""
    parser = build_parser(option_type, description=description)
    parser.add_argument(name, nargs="?" if optional else None, default=None, help=help)
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**_read_config(parser, first.config))
    options, rest = parser.parse_args_into_dataclasses(argv)
    return options, getattr(rest, name)


def where_filter(pairs: list[str]) -> dict | None:
    """The metadata filter of `--where KEY=VALUE ...` (None for none); a pair without "=" exits with an error."""
    for text in pairs:
        key, sep, _ = text.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --where {text!r} is not KEY=VALUE")
    return dict(text.partition("=")[::2] for text in pairs) or None


@dataclass
class SearchOptions:
    # ---- index ----
    index: str = field(metadata={"help": "an index folder written by `tiny-hf index`"})
    encoder: str | None = field(default=None, metadata={"help": "model folder (default: the index's own encoder)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    # ---- ranking ----
    mode: str = field(default="hybrid", metadata={"help": "retriever", "choices": list(SEARCH_MODES)})
    top_k: int = field(default=5, metadata={"help": "results to show", "aliases": ["-k"]})
    rrf_k: int = field(default=60, metadata={"help": "k of reciprocal rank fusion (hybrid)"})
    candidates: int = field(default=100, metadata={"help": "depth of each ranking before fusion"})
    # ---- filters ----
    prefix: str | None = field(default=None, metadata={"help": "only documents whose id starts with this (topic/)"})
    where: list[str] = field(
        default_factory=list,
        metadata={"help": "metadata filters, all must hold", "metavar": "KEY=VALUE", "action": "extend"},
    )
    # ---- output ----
    json: bool = field(default=False, metadata={"help": "print the hits as JSON"})
    width: int = field(default=200, metadata={"help": "characters of each chunk shown (text output)"})


def print_hits(hits: list, width: int) -> None:
    """Each hit as rank, score, document and span, then the first `width` characters of its text on one line."""
    for h in hits:
        snippet = " ".join(h.text.split())
        snippet = snippet if len(snippet) <= width else snippet[: width - 3] + "..."
        print(f"{h.rank:>2}. {h.score:.4f}  {h.doc_id} [{h.start}:{h.end}]\n    {snippet}")
    if not hits:
        print("no results")


def main(argv: list[str] | None = None) -> list[dict]:
    options, query = parse_with_positional(
        SearchOptions, argv, name="query", help="the query text", description=__doc__
    )
    where = where_filter(options.where)
    encoder = Encoder(options.encoder, device=options.device) if options.encoder else None
    index = load_rag_index(options.index, flag="--index", encoder=encoder)
    hits = index.search(
        query,
        k=options.top_k,
        mode=options.mode,
        prefix=options.prefix,
        where=where,
        rrf_k=options.rrf_k,
        candidates=options.candidates,
    )
    results = [h.to_dict() for h in hits]
    if options.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print_hits(hits, options.width)
    return results


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
