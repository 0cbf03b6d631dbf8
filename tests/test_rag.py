"""The retriever (rag/): chunking, BM25 against bm25s and rank_bm25, dense embeddings against sentence-transformers,
reciprocal rank fusion, the index folder (save/load, add/delete, filters, corruption, encoder mismatch) and the CLIs.

Kept fast: BM25 runs on the 79 pydoc topics (no model); everything dense shares one all-MiniLM-L6-v2 and one small
index of short topic excerpts.
"""

import copy
import json
import shutil
import warnings

import bm25s
import numpy as np
import pytest
import rank_bm25
import torch

from rag import (
    BM25,
    BM25_VARIANTS,
    CorruptIndexError,
    Encoder,
    EncoderMismatchError,
    RagIndex,
    VectorStore,
    WordAnalyzer,
    chunk_documents,
    chunk_text,
    mean_pool,
    reciprocal_rank_fusion,
    top_k,
)
from tiny_hf.corpus import topic_documents

QUERIES = ["if statement else", "the class of an object", "yield from generator expression", "lambda lambda the"]


@pytest.fixture(scope="module")
def topics():
    return topic_documents()


@pytest.fixture(scope="module")
def topic_tokens(topics):
    analyzer = WordAnalyzer()
    return [analyzer(d["text"]) for d in topics]


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


@pytest.fixture(scope="module")
def small_docs(topics):
    """Eight short topic excerpts with metadata: a corpus the encoder embeds in a few seconds."""
    picked = [d for d in topics if d["id"] in {f"topic/{n}" for n in ("assert", "if", "while", "for", "lambda")}]
    picked += [d for d in topics if d["id"] in {"topic/pass", "topic/return", "topic/import"}]
    return [{**d, "text": d["text"][:900], "kind": "statement"} for d in picked]


@pytest.fixture(scope="module")
def built_index(encoder, small_docs, tmp_path_factory):
    index = RagIndex(encoder, chunk_size=64, overlap=8)
    index.add(small_docs)
    path = index.save(tmp_path_factory.mktemp("index") / "ix")
    return index, path


# ---- chunking ----
def test_chunks_point_into_their_documents(encoder, topics):
    docs = topics[:10]
    chunks = chunk_documents(docs, encoder.tokenizer, chunk_size=48, overlap=8)
    by_id = {d["id"]: d["text"] for d in docs}
    assert {c.doc_id for c in chunks} == set(by_id)
    for c in chunks:
        assert by_id[c.doc_id][c.start : c.end] == c.text
        assert c.text == c.text.strip() and 0 < c.n_tokens <= 48
        assert len(encoder.tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 48
        assert c.metadata == {"source": "pydoc_topics"}
    # every token of every document lies in some chunk
    for doc in docs:
        spans = [(c.start, c.end) for c in chunks if c.doc_id == doc["id"]]
        offsets = encoder.tokenizer(doc["text"], add_special_tokens=False, return_offsets_mapping=True)
        for s, e in offsets["offset_mapping"]:
            assert any(a <= s and e <= b for a, b in spans), doc["text"][s:e]


def test_chunks_break_at_paragraphs_and_keep_headings_with_their_text(encoder):
    paragraph = "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi."
    doc = "\n\n".join([paragraph] * 3) + "\n\nA Heading\n*********\n\n" + "\n\n".join([paragraph] * 3)
    chunks = chunk_text(doc, encoder.tokenizer, chunk_size=60, overlap=0)
    assert len(chunks) > 2
    for c in chunks:
        assert c.text.endswith(paragraph), c.text  # every cut falls at a paragraph end
        assert not c.text.rstrip().endswith("*")  # never a heading at the end of a chunk
    assert any(c.text.startswith("A Heading") for c in chunks)  # the section starts a chunk


def test_chunk_overlap(encoder):
    text = " ".join(f"word{i}" for i in range(300))  # one paragraph, no sentences: cuts between words
    plain = chunk_text(text, encoder.tokenizer, chunk_size=50, overlap=0)
    shared = chunk_text(text, encoder.tokenizer, chunk_size=50, overlap=10)
    assert all(a.end < b.start for a, b in zip(plain, plain[1:], strict=False))
    assert all(b.start < a.end for a, b in zip(shared, shared[1:], strict=False))
    assert all(text[c.start - 1] == " " for c in shared[1:])  # the overlap starts at a word
    assert len(shared) > len(plain)


def test_chunking_with_byte_level_bpe(tiny_lm_dir, topics):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)  # spaces ride at the front of byte-level tokens
    doc = topics[3]["text"]
    chunks = chunk_text(doc, tokenizer, chunk_size=40, overlap=5)
    assert len(chunks) > 3
    for c in chunks:
        assert doc[c.start : c.end] == c.text and c.text == c.text.strip()


@pytest.mark.parametrize(
    "kwargs, documents, match",
    [
        ({"chunk_size": 32, "overlap": 32}, ["text"], "overlap=32"),
        ({"chunk_size": 0, "overlap": 0}, ["text"], "chunk_size=0"),
        ({"chunk_size": 32, "overlap": -1}, ["text"], "overlap=-1"),
        ({}, [], "empty"),
        ({}, ["   ", "\n\n"], "no text"),
        ({}, [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "unique"),
        ({}, [{"id": "a"}], "no 'text'"),
    ],
)
def test_chunking_errors(encoder, kwargs, documents, match):
    with pytest.raises(ValueError, match=match):
        chunk_documents(documents, encoder.tokenizer, **kwargs)


# ---- BM25 ----
@pytest.mark.parametrize("method", ["robertson", "lucene", "atire", "bm25l", "bm25+"])
def test_bm25_equals_bm25s(method, topic_tokens):
    ours = BM25(method=method).index(topic_tokens)
    ref = bm25s.BM25(method=method)
    ref.index(topic_tokens, show_progress=False)
    analyzer = WordAnalyzer()
    for query in QUERIES:
        # bm25s keeps float32 scores
        np.testing.assert_allclose(ours.get_scores(query), ref.get_scores(analyzer(query)), rtol=1e-5, atol=1e-5)


def test_bm25_okapi_equals_rank_bm25(topic_tokens):
    ours = BM25(method="okapi").index(topic_tokens)
    ref = rank_bm25.BM25Okapi(topic_tokens)  # epsilon 0.25: idf floor for words in most documents
    for query in QUERIES:
        tokens = WordAnalyzer()(query)
        np.testing.assert_allclose(ours.get_scores(tokens), ref.get_scores(tokens), rtol=1e-12, atol=1e-12)
    # the bm25s README recipe: okapi without the floor is atire's tfc with robertson's (clamped) idf
    ours = BM25(method="okapi", epsilon=0.0).index(topic_tokens)
    ref = bm25s.BM25(method="atire", idf_method="robertson")
    ref.index(topic_tokens, show_progress=False)
    np.testing.assert_allclose(ours.get_scores(QUERIES[1]), ref.get_scores(WordAnalyzer()(QUERIES[1])), atol=1e-5)


def test_bm25_add_and_delete_equal_a_fresh_index(topics):
    texts = [d["text"] for d in topics[:30]]
    for method in ("okapi", "bm25+"):
        full = BM25(method=method).index(texts)
        grown = BM25(method=method).index(texts[:20]).add(texts[20:])
        shrunk = BM25(method=method).index(texts + ["zebra unicorn xylophone"] + texts[:3]).delete([30, 31, 32, 33])
        assert "zebra" not in shrunk.vocab and len(shrunk.vocab) == len(full.vocab)
        for query in QUERIES + ["zebra statement"]:
            np.testing.assert_allclose(grown.get_scores(query), full.get_scores(query), atol=1e-12)
            np.testing.assert_allclose(shrunk.get_scores(query), full.get_scores(query), atol=1e-12)


def test_bm25_state_round_trip_and_analyzer(topics):
    texts = [d["text"] for d in topics[:20]]
    bm25 = BM25(method="atire", k1=1.2, b=0.5, analyzer=WordAnalyzer(stopwords="english")).index(texts)
    arrays, meta = bm25.state()
    json.dumps(meta)  # JSON-able
    back = BM25.from_state(arrays, meta)
    np.testing.assert_allclose(back.get_scores("the for statement"), bm25.get_scores("the for statement"))
    assert WordAnalyzer(stopwords="english")("The Cat, and the HAT's") == ["cat", "hat", "s"]
    with pytest.raises(ValueError, match="only a WordAnalyzer"):
        BM25(analyzer=str.split).index(["a b"]).state()


def test_bm25_errors():
    with pytest.raises(ValueError, match=r"method='bm26' is not one of \['robertson'"):
        BM25(method="bm26")
    with pytest.raises(ValueError, match="empty"):
        BM25().index([])
    assert set(BM25_VARIANTS) == {"robertson", "lucene", "atire", "bm25l", "bm25+", "okapi"}


def test_top_k_breaks_ties_by_lower_index():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, -np.inf])
    idx, vals = top_k(scores, 2)
    assert idx.tolist() == [1, 2] and vals.tolist() == [3.0, 3.0]
    assert top_k(scores, 10)[0].tolist() == [1, 2, 4, 3, 0]  # -inf (filtered) never comes back
    bm25 = BM25().index(["apple pie", "apple tart", "apple pie"])
    assert bm25.retrieve("apple pie", k=3)[0].tolist() == [0, 2, 1]


# ---- reciprocal rank fusion ----
def test_reciprocal_rank_fusion_hand_worked():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60)
    # 1: 1/61 + 1/62 = 0.032522;  3: 1/63 + 1/61 = 0.032266;  2: 1/62;  4: 1/63
    assert [d for d, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62) and fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert reciprocal_rank_fusion([[2, 1], [2, 3]], k=0) == [(2, 2.0), (1, 0.5), (3, 0.5)]  # tie: lower id first
    assert reciprocal_rank_fusion([[6, 5], [5, 6]]) == [(5, pytest.approx(1 / 61 + 1 / 62)), (6, 1 / 61 + 1 / 62)]


# ---- dense ----
def test_minilm_equals_sentence_transformers(encoder, topics):
    st = pytest.importorskip("sentence_transformers")
    texts = [d["text"][:400] for d in topics[:12]] + [topics[0]["text"]]  # the last one passes 256 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = encoder.encode(texts)
    ref = st.SentenceTransformer(encoder.name, device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_tensor=True
    )
    assert encoder.max_length == 256 and encoder.dim == 384
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-5, rtol=0)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_long_query_is_truncated_with_a_warning(encoder):
    long = "retrieval " * 400
    with pytest.warns(UserWarning, match="exceed the encoder window of 256 tokens"):
        v = encoder.encode([long])
    assert torch.linalg.vector_norm(v, dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="exceed the encoder window"):
        encoder.encode([long], overflow="error")
    with pytest.raises(ValueError, match="overflow='cut'"):
        encoder.encode(["x"], overflow="cut")


def test_tiny_model_encoder_is_padding_invariant(tiny_lm_dir):
    encoder = Encoder(str(tiny_lm_dir))  # our TinyModel, through AutoModel
    texts = ["a short one", "a much longer text that forces the first one to be padded in the batch"]
    batched = encoder.encode(texts)
    alone = encoder.encode(texts[:1])
    assert batched.shape == (2, 32)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(batched, dim=-1), torch.ones(2))


@pytest.mark.parametrize("storage, atol", [("fp32", 1e-6), ("fp16", 2e-3), ("int8", 1.5e-2)])
def test_vector_store(storage, atol):
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(50, 384), dim=-1)
    store = VectorStore(384, storage=storage)
    store.add(v[:30])
    store.add(v[30:])
    torch.testing.assert_close(store.scores(v), v @ v.T, atol=atol, rtol=0)
    assert (store.scores(v).argmax(dim=1) == torch.arange(50)).all()  # each vector finds itself
    store.delete([0, 1])
    back = VectorStore.from_state(store.state(), storage=storage)
    torch.testing.assert_close(back.vectors(), store.vectors())
    assert len(back) == 48
    with pytest.raises(ValueError, match="storage='int4'"):
        VectorStore(4, storage="int4")


# ---- the index ----
@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_index_search_modes(built_index, mode):
    index, _ = built_index
    hits = index.search("How does the assert statement raise AssertionError?", k=3, mode=mode)
    assert len(hits) == 3 and hits[0].doc_id == "topic/assert"
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
    assert hits[0].text == index.chunks[hits[0].chunk_index].text


def test_index_filters(built_index):
    index, _ = built_index
    hits = index.search("loop", k=20, mode="bm25", prefix="topic/wh")
    assert hits and {h.doc_id for h in hits} == {"topic/while"}
    hits = index.search("loop statement", k=50, mode="hybrid", where={"id": "topic/for", "kind": "statement"})
    assert hits and {h.doc_id for h in hits} == {"topic/for"}
    assert index.search("loop", mode="dense", where={"kind": "expression"}) == []
    with pytest.raises(ValueError, match="mode='sparse'"):
        index.search("loop", mode="sparse")


def test_index_save_load_round_trip(built_index, encoder):
    index, path = built_index
    loaded = RagIndex.load(path)
    assert loaded._encoder is None  # BM25 needs no encoder
    query = "while loop condition"
    assert [h.to_dict() for h in loaded.search(query, mode="bm25")] == [
        h.to_dict() for h in index.search(query, mode="bm25")
    ]
    assert loaded._encoder is None
    dense = [h.chunk_index for h in loaded.search(query, mode="hybrid")]  # loads and checks the recorded encoder
    assert dense == [h.chunk_index for h in index.search(query, mode="hybrid")]
    assert loaded.doc_ids == index.doc_ids and loaded.tokenizer_info == index.tokenizer_info
    config = json.loads((path / "index.json").read_text())
    assert config["encoder"]["name"].endswith("model") and config["chunking"] == {"chunk_size": 64, "overlap": 8}
    assert not list(path.glob("*.pkl")) and not list(path.glob("*.pickle"))


def test_index_add_and_delete(encoder, small_docs, tmp_path):
    index = RagIndex(encoder, chunk_size=64, overlap=8, storage="int8")
    index.add(small_docs[:3])
    n = index.add(small_docs[3:5])
    assert n > 0 and index.doc_ids == [d["id"] for d in small_docs[:5]]
    with pytest.raises(ValueError, match="already indexed"):
        index.add(small_docs[:1])
    removed = index.delete([small_docs[0]["id"]])
    assert removed > 0 and small_docs[0]["id"] not in index.doc_ids
    with pytest.raises(KeyError, match="not in the index"):
        index.delete(["topic/nope"])
    # the same as an index built from the remaining documents alone
    fresh = RagIndex(encoder, chunk_size=64, overlap=8, storage="int8")
    fresh.add(small_docs[1:5])
    assert [c.text for c in index.chunks] == [c.text for c in fresh.chunks]
    np.testing.assert_allclose(index.bm25.get_scores("if else"), fresh.bm25.get_scores("if else"), atol=1e-12)
    torch.testing.assert_close(index.vectors.vectors(), fresh.vectors.vectors())
    loaded = RagIndex.load(index.save(tmp_path / "ix"), encoder=encoder)
    assert loaded.vectors.storage == "int8" and loaded.vectors.data.dtype == torch.int8
    assert [h.chunk_index for h in loaded.search("for loop", mode="dense")] == [
        h.chunk_index for h in index.search("for loop", mode="dense")
    ]


def test_index_rejects_a_chunk_size_past_the_window(encoder):
    with pytest.raises(ValueError, match="chunk_size=300 does not fit the encoder window: at most 254"):
        RagIndex(encoder, chunk_size=300)


@pytest.mark.parametrize("damage", ["truncate", "edit", "missing", "config"])
def test_corrupt_index_is_refused(built_index, tmp_path, damage):
    _, path = built_index
    copy_dir = tmp_path / "ix"
    shutil.copytree(path, copy_dir)
    if damage == "truncate":
        data = (copy_dir / "vectors.safetensors").read_bytes()
        (copy_dir / "vectors.safetensors").write_bytes(data[: len(data) // 2])
        match = "vectors.safetensors has .* bytes"
    elif damage == "edit":
        text = (copy_dir / "chunks.json").read_text()
        (copy_dir / "chunks.json").write_text(text.replace("assert", "assort", 1))
        match = "chunks.json does not match its recorded sha256"
    elif damage == "missing":
        (copy_dir / "bm25.json").unlink()
        match = "bm25.json is missing"
    else:
        (copy_dir / "index.json").write_text('{"format": "tiny-hf-rag-index", "vers')
        match = "index.json is not valid JSON"
    with pytest.raises(CorruptIndexError, match=match):
        RagIndex.load(copy_dir)
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        RagIndex.load(tmp_path)


def test_encoder_mismatch_is_refused(built_index, encoder, tiny_lm_dir):
    _, path = built_index
    with pytest.raises(EncoderMismatchError, match="tokenizer mismatch"):
        RagIndex.load(path, encoder=Encoder(str(tiny_lm_dir)))
    perturbed = copy.deepcopy(encoder.model)
    with torch.no_grad():
        perturbed.embeddings.word_embeddings.weight.mul_(1.5)
    other = Encoder(perturbed, tokenizer=encoder.tokenizer)
    with pytest.raises(EncoderMismatchError, match="embeds the probe text differently"):
        RagIndex.load(path, encoder=other)
    RagIndex.load(path, encoder=encoder)  # its own encoder is fine


# ---- CLIs ----
def test_index_and_search_cli(small_docs, tmp_path, capsys):
    from rag import index as index_cli
    from rag import search as search_cli

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in small_docs[:-1]))
    out = tmp_path / "ix"
    summary = index_cli.main(["--data", str(data), "--out", str(out), "--chunk-size", "64", "--max-docs", "6"])
    assert summary["documents"] == 6 and summary["chunks"] > 6 and (out / "index.json").is_file()
    # --max-docs takes rag.evaluate's fixed pseudo-random sample, not the first N
    sample = {d["id"] for d in index_cli.sample_documents(small_docs[:-1], 6)}
    assert {c.doc_id for c in index_cli.RagIndex.load(out).chunks} == sample
    four = [d["id"] for d in index_cli.sample_documents(small_docs, 4)]
    assert four == sorted(four) != [d["id"] for d in small_docs[:4]]
    hits = search_cli.main(["--index", str(out), "assert statement", "--mode", "bm25", "-k", "2"])
    assert len(hits) == 2 and hits[0]["doc_id"] == "topic/assert"
    assert "topic/assert" in capsys.readouterr().out
    hits = search_cli.main(["--index", str(out), "conditional execution", "--json", "--where", "kind=statement"])
    assert hits[0]["doc_id"] == "topic/if" and json.loads(capsys.readouterr().out)[0]["doc_id"] == "topic/if"
    summary = index_cli.main(["--out", str(out), "--delete", "topic/if"])
    assert summary["documents"] == 5 and summary["removed_chunks"] > 0
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps(small_docs[-1]) + "\n")
    summary = index_cli.main(["--data", str(more), "--out", str(out), "--append"])
    assert summary["documents"] == 6 and summary["added_chunks"] > 0
    hits = search_cli.main(["--index", str(out), "return statement", "--mode", "bm25", "-k", "1"])
    assert hits[0]["doc_id"] == small_docs[-1]["id"] == "topic/return"
    with pytest.raises(SystemExit):
        search_cli.main(["--index", str(out), "q", "--where", "novalue"])
