"""Search an index folder built by `rag.index`: BM25, dense, or hybrid (reciprocal rank fusion of both).

CLI: `python -m rag.search --index DIR "query" [--mode bm25|dense|hybrid] [-k 5] [--prefix topic/]
[--where source=pydoc_topics] [--json]`. BM25 searches never load the encoder; dense and hybrid ones load the encoder
recorded in the index (or `--encoder`) and refuse one that does not match it.
"""

from __future__ import annotations

import argparse
import json

from .dense import Encoder
from .index import SEARCH_MODES, RagIndex


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--where {text!r} is not KEY=VALUE")
    return key, value


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # ---- index and query ----
    io = parser.add_argument_group("index and query")
    io.add_argument("--index", required=True, help="an index folder written by `python -m rag.index`")
    io.add_argument("query", help="the query text")
    io.add_argument("--encoder", default=None, help="model folder (default: the encoder recorded in the index)")
    io.add_argument("--device", default="cpu", help="cpu or cuda")
    # ---- ranking ----
    ranking = parser.add_argument_group("ranking")
    ranking.add_argument("--mode", default="hybrid", choices=list(SEARCH_MODES), help="retriever")
    ranking.add_argument("-k", "--top-k", dest="k", type=int, default=5, help="results to show")
    ranking.add_argument("--rrf-k", type=int, default=60, help="k of reciprocal rank fusion (hybrid)")
    ranking.add_argument("--candidates", type=int, default=100, help="depth of each ranking before fusion")
    # ---- filters ----
    filters = parser.add_argument_group("filters")
    filters.add_argument("--prefix", default=None, help="only documents whose id starts with this (e.g. topic/)")
    filters.add_argument(
        "--where", type=_key_value, action="append", default=[], metavar="KEY=VALUE", help="metadata filter"
    )
    # ---- output ----
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the hits as JSON")
    out.add_argument("--width", type=int, default=200, help="characters of each chunk shown (text output)")
    args = parser.parse_args(argv)

    encoder = Encoder(args.encoder, device=args.device) if args.encoder else None
    index = RagIndex.load(args.index, encoder=encoder)
    hits = index.search(
        args.query,
        k=args.k,
        mode=args.mode,
        prefix=args.prefix,
        where=dict(args.where) or None,
        rrf_k=args.rrf_k,
        candidates=args.candidates,
    )
    results = [h.to_dict() for h in hits]
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for h in hits:
            snippet = " ".join(h.text.split())
            snippet = snippet if len(snippet) <= args.width else snippet[: args.width - 3] + "..."
            print(f"{h.rank:>2}. {h.score:.4f}  {h.doc_id} [{h.start}:{h.end}]\n    {snippet}")
        if not hits:
            print("no results")
    return results


if __name__ == "__main__":
    main()
