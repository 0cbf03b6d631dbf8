"""Retrieval side by side: our BM25 / dense / hybrid vs bm25s and sentence-transformers, in one process.

Three tables:

1. Quality on the held-out query set of rag.evaluate (questions rewritten from docstring summaries and pydoc topic
   sentences, one relevant chunk each): recall@1/5/10, MRR@10, nDCG@10 as BEIR computes them. Embedding chunks with
   all-MiniLM-L6-v2 runs at ~10 chunks/s on a loaded 2-core CPU, so this table uses a fixed pseudo-random sample of
   `--max-docs` documents (0: all ~670 documents, ~4,900 chunks).
2. BM25 speed vs bm25s on every chunk of the full corpus (chunking needs only the tokenizer): index build time and
   queries/s, each library from raw text with its own tokenizer (bm25s.tokenize, no stopwords), and from the same
   token lists. bm25s answers a batch of queries in one call (its usual use); ours answers them one by one.
3. Exact dense search at scale: synthetic unit 384-d vectors (10k, 100k, 1M) in rag.dense.VectorStore as fp32,
   fp16 and int8; memory, latency per query (scores + top-10), and recall@10 of fp16 / int8 against fp32, for
   synthetic queries (a stored vector plus noise of the same norm) and for the real query set on the real chunks.

Per query kind (rag.evaluate.QUERY_KINDS: docstring and topic as before; paraphrase, whose key terms are replaced
by descriptions; held_out, whose source sentence was removed from the index before it was built), table 1 is
repeated for our three retrievers with 95% intervals: Wilson for recall@k (a rate: one relevant chunk per query),
percentile bootstrap for MRR@10 and nDCG@10 (per-query scores), and which differences between retrievers are beyond
noise (the intervals do not overlap; tiny_hf.results).

4. Grounded answers (written to `<name>_answers.md/json`): each `--model` (a generator that is not there is reported
   as skipped) answers the first `--answers` questions of the paraphrase and held_out kinds with the top `--top-k`
   hybrid passages in its prompt and without (rag.answer.measure_answers): whether the answer names the documented
   object (Wilson) and ROUGE-L F1 against its qualified name (bootstrap).

Quote ratios: absolute times hold only for this machine and its load.

    tiny-hf bench rag                         # ~15 minutes on 1 thread of a loaded CPU, SmolLM2 answers included
    tiny-hf bench rag --answers 0 --max-docs 0 --device cuda --results bench/results
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rag.bm25 import BM25, top_k
from rag.chunking import chunk_documents
from rag.dense import STORAGE_DTYPES, Encoder, VectorStore
from rag.evaluate import (
    QUERY_KINDS,
    RETRIEVER_NAMES,
    RETRIEVERS,
    build_queries,
    evaluate_index,
    hold_out_summaries,
)
from rag.index import RagIndex, sample_documents
from tiny_hf.corpus import build_documents, stable_fraction
from tiny_hf.results import (
    RESULTS_DIR,
    beyond_noise,
    bootstrap_interval,
    interval_cell,
    markdown_cell,
    wilson_interval,
    write_results,
)

# The retrievers the per-kind tables compare with intervals (the peers give the same figures as ours: table 1).
OURS = ("bm25", "dense", "hybrid")
KIND_NOTES = {
    "docstring": "a docstring summary, object name out, ~60 synonyms (most words still the chunk's)",
    "topic": "a pydoc topic sentence, rewritten the same way",
    "paraphrase": "a docstring summary with key terms replaced by descriptions, identifiers out",
    "held_out": "a docstring summary that was removed from the index: only the rest of the docstring is there",
}
DEFAULT_GENERATORS = ["runs/smollm2/model", "runs/sft"]
ANSWER_BATCH = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- data ----
    data = parser.add_argument_group("data")
    data.add_argument("--max-docs", type=int, default=200, help="documents embedded for the quality table (0: all)")
    data.add_argument(
        "--queries", type=int, default=300, help="queries at most: docstring + topic, and each other kind"
    )
    data.add_argument("--per-doc", type=int, default=3, help="queries per document at most, per kind set")
    data.add_argument("--kinds", nargs="+", default=list(QUERY_KINDS), help=f"query kinds, from {list(QUERY_KINDS)}")
    data.add_argument("--hold-out", type=float, default=0.5, help="share of eligible docstring summaries held out")
    data.add_argument("--chunk-size", type=int, default=200)
    data.add_argument("--overlap", type=int, default=32)
    # ---- run ----
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="where the encoder runs")
    run.add_argument("--repeats", type=int, default=3, help="BM25 timings are the best of this many runs")
    run.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="synthetic vectors")
    run.add_argument("--scale-queries", type=int, default=20, help="timed queries per size (fewer at 1M)")
    run.add_argument("--seed", type=int, default=0)
    # ---- output ----
    out = parser.add_argument_group("output")
    # ---- grounded answers ----
    gen = parser.add_argument_group("grounded answers")
    gen.add_argument("--model", nargs="+", default=DEFAULT_GENERATORS, help="generators (a missing one is skipped)")
    gen.add_argument("--answers", type=int, default=40, help="paraphrase + held_out questions answered (0: none)")
    gen.add_argument("--top-k", type=int, default=4, help="hybrid passages retrieved for the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    out.add_argument("--results", "--out", dest="results", type=Path, default=RESULTS_DIR)
    out.add_argument("--name", default="rag", help="results file stem")
    args = parser.parse_args(argv)
    if unknown := [k for k in args.kinds if k not in QUERY_KINDS]:
        raise ValueError(f"--kinds {unknown} are not among {list(QUERY_KINDS)}")
    return args


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- 1. quality ----
def interval_figures(per_query: list[dict]) -> dict:
    """recall@k as Wilson rates (one relevant chunk per query, so each query scores 0 or 1), MRR@10 and nDCG@10 as
    bootstrap means."""
    out = {}
    for metric in per_query[0]:
        values = [m[metric] for m in per_query]
        if metric.startswith("recall@"):
            out[metric] = wilson_interval(round(sum(values)), len(values))
        else:
            out[metric] = bootstrap_interval(values)
    return out


def by_kind(results: dict, queries: list) -> dict:
    """kind ("all" first) -> retriever -> metric -> interval, for our retrievers; and the pairs beyond noise."""
    kinds = ["all"] + [k for k in QUERY_KINDS if any(q.source == k for q in queries)]
    table = {}
    for kind in kinds:
        rows = [i for i, q in enumerate(queries) if kind == "all" or q.source == kind]
        figures = {r: interval_figures([results[r]["per_query"][i] for i in rows]) for r in OURS if r in results}
        beyond = {}
        for metric in next(iter(figures.values())):
            for a, b in [("bm25", "dense"), ("bm25", "hybrid"), ("dense", "hybrid")]:
                if a in figures and b in figures and beyond_noise(figures[a][metric], figures[b][metric]):
                    value = {r: f[metric].get("rate", f[metric].get("mean")) for r, f in figures.items()}
                    beyond.setdefault(metric, []).append(
                        f"{a if value[a] > value[b] else b} > {b if value[a] > value[b] else a}"
                    )
        table[kind] = {"queries": len(rows), "retrievers": figures, "beyond_noise": beyond}
    return table


def quality(args: argparse.Namespace, docs: list[dict], encoder: Encoder) -> tuple[dict, RagIndex, list]:
    subset = sample_documents(docs, args.max_docs or None)
    held_docs, held = hold_out_summaries(subset, fraction=args.hold_out)
    index = RagIndex(encoder, chunk_size=args.chunk_size, overlap=args.overlap)
    t0 = time.perf_counter()
    index.add(held_docs)
    embed_s = time.perf_counter() - t0
    queries = build_queries(index.chunks, n=args.queries, per_doc=args.per_doc, kinds=args.kinds, held_out=held)
    sources = {k: sum(q.source == k for q in queries) for k in QUERY_KINDS}
    print(f"quality: {sources} queries, {len(index)} chunks of {len(subset)} documents ({embed_s:.0f} s to embed)")
    results = evaluate_index(index, queries, retrievers=RETRIEVERS, per_query=True)
    kinds = by_kind(results, queries)
    for m in results.values():
        del m["per_query"]
    # int8 / fp16 storage on the real vectors: how much of the fp32 top-10 they keep, and the quality they give
    texts = [q.text for q in queries]
    qvec = encoder.encode(texts, overflow="truncate")
    fp32 = VectorStore(encoder.dim, storage="fp32")
    fp32.add(index.vectors.vectors())
    truth = [top_k(s.numpy(), 10)[0] for s in fp32.scores(qvec)]
    real_recall = {}
    for storage in ("fp16", "int8"):
        store = VectorStore(encoder.dim, storage=storage)
        store.add(fp32.vectors())
        got = [top_k(s.numpy(), 10)[0] for s in store.scores(qvec)]
        real_recall[storage] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)]))
    examples = []
    for kind in QUERY_KINDS:
        examples += [
            {"kind": kind, "text": q.text, "sentence": q.sentence, "answer": q.answer}
            for q in [q for q in queries if q.source == kind][:2]
        ]
    figures = {
        "documents": len(subset),
        "chunks": len(index),
        "queries": len(queries),
        "query_sources": sources,
        "held_out_summaries": len(held),
        "embed_seconds": embed_s,
        "chunks_per_s": len(index) / embed_s,
        "retrievers": results,
        "by_kind": kinds,
        "real_recall_at_10_vs_fp32": real_recall,
        "example_queries": examples,
    }
    return figures, index, queries


# ---- 2. BM25 speed ----
def bm25_speed(args: argparse.Namespace, docs: list[dict], tokenizer) -> dict:
    import bm25s

    chunks = chunk_documents(docs, tokenizer, chunk_size=args.chunk_size, overlap=args.overlap)
    texts = [c.text for c in chunks]
    queries = [q.text for q in build_queries(chunks, n=1000)]
    ours = BM25(method="lucene")
    tokens = [ours.analyzer(t) for t in texts]
    q_tokens = [ours.analyzer(q) for q in queries]

    def peer_index(corpus):
        r = bm25s.BM25(method="lucene")
        r.index(corpus, show_progress=False)
        return r

    def peer_from_text():
        return peer_index(bm25s.tokenize(texts, stopwords=None, show_progress=False))

    figures = {"chunks": len(texts), "queries": len(queries)}
    figures["build_s"] = {
        "ours_text": best_time(lambda: BM25(method="lucene").index(texts), args.repeats),
        "bm25s_text": best_time(peer_from_text, args.repeats),
        "ours_tokens": best_time(lambda: BM25(method="lucene").index(tokens), args.repeats),
        "bm25s_tokens": best_time(lambda: peer_index(tokens), args.repeats),
    }
    ours.index(texts)
    ours.get_scores("warm up")  # the weighted matrix is built lazily on the first query
    peer_text, peer_tok = peer_from_text(), peer_index(tokens)
    known = [[t for t in q if t in peer_tok.vocab_dict] or [next(iter(peer_tok.vocab_dict))] for q in q_tokens]

    def ours_queries():
        for q in queries:
            ours.retrieve(q, 10)

    def peer_text_queries():
        toks = bm25s.tokenize(queries, stopwords=None, show_progress=False)
        peer_text.retrieve(toks, k=10, show_progress=False, n_threads=1)

    def peer_tok_queries():
        peer_tok.retrieve(known, k=10, show_progress=False, n_threads=1)

    def peer_tok_one_by_one():
        for q in known:
            peer_tok.retrieve([q], k=10, show_progress=False, n_threads=1)

    n = len(queries)
    figures["queries_per_s"] = {
        "ours_one_by_one": n / best_time(ours_queries, args.repeats),
        "bm25s_text_batch": n / best_time(peer_text_queries, args.repeats),
        "bm25s_tokens_batch": n / best_time(peer_tok_queries, args.repeats),
        "bm25s_tokens_one_by_one": n / best_time(peer_tok_one_by_one, args.repeats),
    }
    return figures


# ---- 3. dense scaling ----
def dense_scaling(args: argparse.Namespace) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    for n in args.sizes:
        base = torch.nn.functional.normalize(torch.randn(n, 384, generator=gen), dim=-1)  # (N, 384)
        n_q = max(3, args.scale_queries if n < 1_000_000 else args.scale_queries // 4)
        picks = torch.randint(0, n, (100,), generator=gen)
        noise = torch.randn(100, 384, generator=gen) / 384**0.5  # norm ~1, like the stored vectors
        queries = torch.nn.functional.normalize(base[picks] + noise, dim=-1)  # (100, 384)
        truth = None
        for storage in STORAGE_DTYPES:
            store = VectorStore(384, storage=storage)
            store.add(base)
            nbytes = store.data.numel() * store.data.element_size()
            nbytes += 0 if store.scale is None else store.scale.numel() * store.scale.element_size()
            store.scores(queries[:1])  # warm up
            latencies = []
            for q in queries[:n_q]:
                t0 = time.perf_counter()
                top_k(store.scores(q)[0].numpy(), 10)
                latencies.append(time.perf_counter() - t0)
            # recall over all 100 queries, scored in blocks of 10 to bound the (10, N) score matrix
            tops = []
            for i in range(0, 100, 10):
                tops += [set(top_k(s.numpy(), 10)[0].tolist()) for s in store.scores(queries[i : i + 10])]
            if truth is None:
                truth = tops
            recall = float(np.mean([len(a & b) / 10 for a, b in zip(tops, truth, strict=True)]))
            rows.append(
                {
                    "vectors": n,
                    "storage": storage,
                    "memory_mb": nbytes / 2**20,
                    "ms_per_query": 1000 * statistics.median(latencies),
                    "recall_at_10_vs_fp32": recall,
                }
            )
            print(f"dense: {n:>9,} {storage}: {rows[-1]['ms_per_query']:.1f} ms/query, recall@10 {recall:.3f}")
            del store
            gc.collect()
        del base
        gc.collect()
    return rows


# ---- 4. grounded answers ----
def answer_questions(queries: list, n: int) -> list:
    """The first n questions of the paraphrase and held_out kinds, by a stable hash of their ids (both kinds mixed)."""
    new = [q for q in queries if q.source in ("paraphrase", "held_out")]
    return sorted(new, key=lambda q: stable_fraction(f"answer:{q.qid}"))[:n]


def grounded_answers(args: argparse.Namespace, index: RagIndex, queries: list) -> dict:
    from rag.answer import load_generator, measure_answers

    questions = answer_questions(queries, args.answers)
    figures = {"questions": len(questions), "kinds": {k: sum(q.source == k for q in questions) for k in QUERY_KINDS}}
    figures["settings"] = {"top_k": args.top_k, "mode": "hybrid", "max_new_tokens": args.max_new_tokens}
    figures["models"] = {}
    for name in args.model:
        if not Path(name).exists():
            figures["models"][name] = {"skipped": f"{name} does not exist"}
            print(f"answers: {name} does not exist; skipped")
            continue
        model, tokenizer = load_generator(name, device=args.device)
        t0 = time.perf_counter()
        # a few questions per call: the engine sizes its KV cache for (questions in flight) x (the model's window),
        # ~12 GB for 32 SmolLM2 prompts at 8,192 tokens
        rows, exact = [], {"with": 0.0, "without": 0.0}
        for i in range(0, len(questions), ANSWER_BATCH):
            part = questions[i : i + ANSWER_BATCH]
            measured = measure_answers(
                part, index, model, tokenizer, k=args.top_k, mode="hybrid", max_new_tokens=args.max_new_tokens
            )
            rows += measured["per_question"]
            for side in exact:
                exact[side] += measured[f"{side}_retrieval"]["exact_match"] * len(part)
        sides = {}
        for side in ("with", "without"):
            named = [r[f"names_{side}"] for r in rows]
            sides[side] = {
                "names_the_object": wilson_interval(sum(named), len(named)),
                "rougeL_f1": bootstrap_interval([r[f"rougeL_f1_{side}"] for r in rows]),
                "exact_match": exact[side] / len(rows),
            }
        figures["models"][name] = {
            **sides,
            "relevant_in_prompt": wilson_interval(sum(r["relevant_in_prompt"] for r in rows), len(rows)),
            "beyond_noise": {
                m: beyond_noise(sides["with"][m], sides["without"][m]) for m in ("names_the_object", "rougeL_f1")
            },
            "seconds": time.perf_counter() - t0,
            "per_question": rows,
        }
        print(f"answers: {name}: {len(rows)} questions in {figures['models'][name]['seconds']:.0f} s")
        del model
        gc.collect()
    return figures


def answers_table(a: dict, q: dict) -> str:
    s = a["settings"]
    lines = [
        "# RAG answers on paraphrased questions: with vs without retrieval",
        "",
        f"{a['questions']} questions ({a['kinds']['paraphrase']} paraphrase, {a['kinds']['held_out']} held_out; the "
        "first by a stable hash of their ids) of the query set of bench/results/rag.md "
        f"({q['chunks']} chunks of {q['documents']} documents). With retrieval: the top {s['top_k']} {s['mode']} "
        "passages in the chat prompt with the citing system message (rag.answer); without: the question alone. "
        f"Greedy, at most {s['max_new_tokens']} new tokens. The reference is the object's qualified name.",
        "",
        "- *names the object*: the answer holds the last part of the qualified name as a whole word (`dumps` for "
        "`json.dumps`; a question never holds it); a rate with its 95% Wilson interval.",
        "- *ROUGE-L F1* against the qualified name (tiny_hf/metrics/rouge_l.py), mean with a 95% bootstrap interval.",
        "- *beyond noise*: the with and without intervals do not overlap.",
        "",
        "| model | prompt | names the object | ROUGE-L F1 | exact match | relevant chunk in prompt |",
        "|---|---|---:|---:|---:|---:|",
    ]
    skipped = []
    for name, m in a["models"].items():
        if "skipped" in m:
            skipped.append(f"{name} ({m['skipped']})")
            continue
        lines.append(
            f"| {name} | with retrieval | {interval_cell(m['with']['names_the_object'], percent=True)} | "
            f"{interval_cell(m['with']['rougeL_f1'])} | {m['with']['exact_match']:.3f} | "
            f"{interval_cell(m['relevant_in_prompt'], percent=True)} |"
        )
        lines.append(
            f"| | without | {interval_cell(m['without']['names_the_object'], percent=True)} | "
            f"{interval_cell(m['without']['rougeL_f1'])} | {m['without']['exact_match']:.3f} | |"
        )
        verdict = ", ".join(
            f"{metric.replace('_', ' ')}: {'beyond noise' if b else 'within noise'}"
            for metric, b in m["beyond_noise"].items()
        )
        lines.append(f"| | with vs without | {verdict} | | | |")
    if skipped:
        lines += ["", "Not measured: " + "; ".join(skipped) + "."]
    for name, m in a["models"].items():
        if "skipped" in m:
            continue
        lines += ["", f"## Examples: {name} (the first 3 questions)", ""]
        for r in m["per_question"][:3]:
            lines += [
                f"- Q ({r['kind']}): {markdown_cell(r['question'], 200)}",
                f"  - reference: {r['reference']}",
                f"  - with retrieval: {markdown_cell(r['with'], 200)}",
                f"  - without: {markdown_cell(r['without'], 200)}",
            ]
    return "\n".join(lines)


def kind_tables(q: dict) -> list[str]:
    lines = [
        "## Per query kind, with 95% intervals",
        "",
        "recall@k: Wilson interval (each query scores 0 or 1); MRR@10, nDCG@10: percentile bootstrap over queries "
        "(2,000 rounds). *Beyond noise*: the two retrievers' intervals do not overlap (conservative; an overlap does "
        "not prove there is no difference).",
        "",
    ]
    for kind, t in q["by_kind"].items():
        note = KIND_NOTES.get(kind, "every query of the kinds below")
        lines += [
            f"### {kind}: {t['queries']} queries ({note})",
            "",
            "| retriever | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 |",
            "|---|---|---|---|---|---|",
        ]
        for name, f in t["retrievers"].items():
            cells = " | ".join(interval_cell(f[m]) for m in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"))
            lines.append(f"| {RETRIEVER_NAMES[name]} | {cells} |")
        beyond = "; ".join(f"{m}: {', '.join(pairs)}" for m, pairs in t["beyond_noise"].items()) or "none"
        lines += ["", f"Beyond noise: {beyond}.", ""]
    return lines


def quality_table(q: dict) -> list[str]:
    counts = ", ".join(f"{n} {k}" for k, n in q["query_sources"].items() if n)
    lines = [
        f"## Quality: {q['queries']} held-out queries ({counts}) over {q['chunks']} chunks of {q['documents']} "
        "documents",
        "",
        "A fixed pseudo-random sample of the embedded corpus (rag.index.sample_documents; embedding chunks with "
        f"MiniLM ran at {q['chunks_per_s']:.1f} chunks/s here), {q['held_out_summaries']} docstring summaries "
        "removed before indexing (rag.evaluate.hold_out_summaries). One relevant chunk per query; BEIR metrics; "
        "all kinds together here, per kind below.",
        "",
        "| retriever | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 | queries/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in q["retrievers"].items():
        lines.append(
            f"| {RETRIEVER_NAMES[name]} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | "
            f"{m['mrr@10']:.3f} | {m['ndcg@10']:.3f} | {m['queries_per_s']:.1f} |"
        )
    rr = q["real_recall_at_10_vs_fp32"]
    lines += [
        "",
        f"Real chunk vectors, these queries: top-10 kept vs fp32: fp16 {rr['fp16']:.3f}, int8 {rr['int8']:.3f}.",
        "",
        "Example queries (source sentence -> query):",
        "",
    ]
    lines += [
        f"- {e['kind']}: {markdown_cell(e['sentence'], 160)} -> *{markdown_cell(e['text'], 160)}*"
        for e in q["example_queries"]
    ]
    return lines + [""] + kind_tables(q)


def bm25_table(b: dict) -> list[str]:
    bs, qs = b["build_s"], b["queries_per_s"]
    return [
        f"## BM25 speed vs bm25s 0.3.16: all {b['chunks']} chunks of the full corpus, {b['queries']} queries",
        "",
        "| | ours | bm25s | ours / bm25s (speed) |",
        "|---|---|---|---|",
        f"| index build from text, s | {bs['ours_text']:.2f} | {bs['bm25s_text']:.2f} | "
        f"{bs['bm25s_text'] / bs['ours_text']:.2f}x |",
        f"| index build from the same tokens, s | {bs['ours_tokens']:.2f} | {bs['bm25s_tokens']:.2f} | "
        f"{bs['bm25s_tokens'] / bs['ours_tokens']:.2f}x |",
        f"| queries/s, one by one (same tokens for bm25s) | {qs['ours_one_by_one']:.0f} | "
        f"{qs['bm25s_tokens_one_by_one']:.0f} | {qs['ours_one_by_one'] / qs['bm25s_tokens_one_by_one']:.2f}x |",
        f"| queries/s, ours one by one vs bm25s batch (from text) | {qs['ours_one_by_one']:.0f} | "
        f"{qs['bm25s_text_batch']:.0f} | {qs['ours_one_by_one'] / qs['bm25s_text_batch']:.2f}x |",
        f"| queries/s, ours one by one vs bm25s batch (tokens) | {qs['ours_one_by_one']:.0f} | "
        f"{qs['bm25s_tokens_batch']:.0f} | {qs['ours_one_by_one'] / qs['bm25s_tokens_batch']:.2f}x |",
        "",
        "From text each library uses its own tokenizer (ours: `\\w+`, lowercase; bm25s: 2+ word characters), so the "
        "vocabularies differ slightly; single-threaded bm25s (n_threads=1).",
    ]


def dense_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Exact dense search (rag.dense.VectorStore): synthetic unit 384-d vectors",
        "",
        "| vectors | storage | memory, MB | ms / query | recall@10 vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vectors']:,} | {r['storage']} | {r['memory_mb']:.1f} | {r['ms_per_query']:.2f} | "
            f"{r['recall_at_10_vs_fp32']:.3f} |"
        )
    return lines + [
        "",
        "Queries: a stored vector plus Gaussian noise of the same norm, normalised. Latency includes top-10. fp16 and "
        "int8 stores are widened to fp32 one block of rows at a time for every query (VectorStore.scores): they halve "
        "or quarter the memory, and a CPU without fp16/int8 matmuls pays for the widening in search time.",
    ]


def tables(figures: dict) -> str:
    """The results file: the quality, BM25 speed and dense scaling tables."""
    lines = ["# Retrieval: ours vs bm25s and sentence-transformers", ""]
    lines += quality_table(figures["quality"]) + [""]
    lines += bm25_table(figures["bm25_speed"]) + [""]
    lines += dense_table(figures["dense_scaling"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    docs = build_documents()
    encoder = Encoder(device=args.device)
    figures = {"args": {k: str(v) for k, v in vars(args).items()}}
    figures["bm25_speed"] = bm25_speed(args, docs, encoder.tokenizer)
    print(f"bm25 speed: {figures['bm25_speed']}")
    figures["quality"], index, queries = quality(args, docs, encoder)
    figures["dense_scaling"] = dense_scaling(args)
    figures["total_seconds"] = time.perf_counter() - t_start
    table = tables(figures)
    json_path, md_path = write_results(args.name, figures, table, args.results)
    print(table)
    print(f"\nwrote {json_path} and {md_path} in {figures['total_seconds']:.0f} s")
    if args.answers > 0:
        figures["answers"] = grounded_answers(args, index, queries)
        answers_md = answers_table(figures["answers"], figures["quality"])
        json_path, md_path = write_results(f"{args.name}_answers", figures["answers"], answers_md, args.results)
        print(answers_md)
        print(f"\nwrote {json_path} and {md_path} in {time.perf_counter() - t_start:.0f} s in all")
    return figures


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
