"""Our from-scratch BPE (tiny_hf.bpe) vs the tokenizers library; TinyTokenizerFast as a transformers citizen."""

import json
import os
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tiny_hf import TinyConfig
from tiny_hf.bpe import BPETokenizer, bytes_to_unicode, train_bpe
from tiny_hf.convert import export_tokenizer
from tiny_hf.corpus import topic_documents
from tiny_hf.tokenization_tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, TinyTokenizerFast

VOCAB_SIZE = 1000
TRICKY = [
    "",
    "Hello, world!",
    " leading space and trailing space ",
    "tabs\tand\nnewlines\r\n\n\nand    runs   of     spaces\n    indented",
    "   ",
    "\n\n",
    "don't you'll we've I'm she'd they're it's DON'T",
    "numbers 3.14159 1,000,000 0x1F 1e-9 ٣٤٥",
    "héllo wörld ça va naïve Ångström",
    "日本語のテキストと中文和한국어",
    "emoji 🤗🚀👩‍👩‍👧‍👦 🇫🇷 flags and ZWJ",
    "combining e\u0301 and \u0000 NUL and \u200b zero-width and \U0010ffff",
    "<|endoftext|>",
    "text<|endoftext|>more text<|im_start|>user\nhi<|im_end|>\n",
    "<|bos|><|pad|><|pad|> <|im_end|>x",
    "<|endoftext|",  # an unfinished special token is plain text
    "def f(x):\n    return {'a': [1, 2]}  # comment\n",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d["text"] for d in topic_documents()]  # ~470 KB of pydoc topics, no stdlib parse needed


@pytest.fixture(scope="module")
def bpe(texts) -> BPETokenizer:
    return BPETokenizer.train(texts, VOCAB_SIZE)


@pytest.fixture(scope="module")
def backend(bpe):
    return bpe.to_tokenizers()


@pytest.fixture(scope="module")
def tok(bpe) -> TinyTokenizerFast:
    return bpe.to_transformers(model_max_length=512)


# ---------------------------------------------------------------- ours vs tokenizers


def test_ids_match_tokenizers_on_corpus(bpe, backend, texts):
    sample = texts[:40]
    theirs = [e.ids for e in backend.encode_batch(sample)]
    assert [bpe.encode(t) for t in sample] == theirs


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_tokenizers_on_tricky_strings(bpe, backend, tok, text):
    ids = bpe.encode(text)
    assert ids == backend.encode(text).ids
    assert ids == tok(text)["input_ids"]
    assert bpe.decode(ids) == text
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(bpe):
    ids = bpe.encode("a<|endoftext|>b<|im_start|>")
    assert ids[1] == 0 and ids[-1] == 3 and len(ids) == 4


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_and_parity_on_any_unicode(bpe, backend, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert backend.encode(text).ids == ids
    assert backend.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_fast_tokenizer_round_trip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=VOCAB_SIZE - 1), max_size=30))
def test_decode_of_arbitrary_ids_matches(bpe, backend, ids):
    # Cut multi-byte characters must become U+FFFD the same way in Python and in Rust.
    assert bpe.decode(ids) == backend.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- the trainer


def test_vocab_layout(bpe):
    n = len(SPECIAL_TOKENS)
    by_id = sorted(bpe.vocab, key=bpe.vocab.get)
    assert by_id[:n] == SPECIAL_TOKENS
    assert by_id[n : n + 256] == [bytes_to_unicode()[b] for b in range(256)]
    assert len(bpe.vocab) == VOCAB_SIZE == len(set(bpe.vocab.values()))
    assert sorted(bpe.vocab.values()) == list(range(VOCAB_SIZE))
    assert len(bpe.merges) == VOCAB_SIZE - n - 256
    for rank, (a, b) in enumerate(bpe.merges):  # merge i creates token n + 256 + i
        assert by_id[n + 256 + rank] == a + b


def test_bytes_to_unicode_is_a_printable_bijection():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ" and mapping[ord("A")] == "A"


def test_trainer_is_deterministic_and_order_free(texts):
    sample = texts[:60]
    vocab, merges = train_bpe(sample, 600, SPECIAL_TOKENS)
    assert train_bpe(sample, 600, SPECIAL_TOKENS) == (vocab, merges)
    shuffled = sample[:]
    random.Random(0).shuffle(shuffled)
    assert train_bpe(shuffled, 600, SPECIAL_TOKENS) == (vocab, merges)  # counts, not order, decide


def test_trainer_learns_the_obvious_merge():
    vocab, merges = train_bpe(["low lower lowest " * 50], 300, SPECIAL_TOKENS)
    assert merges[0] in {("l", "o"), ("o", "w"), ("Ġ", "l")}
    assert "Ġlow" in vocab


def test_trainer_never_merges_into_special_tokens():
    vocab, _ = train_bpe(["ab<|endoftext|>ab<|endoftext|>ab"], 262 + len(SPECIAL_TOKENS), SPECIAL_TOKENS)
    assert "ab" in vocab and not any("<|" in t and t not in SPECIAL_TOKENS for t in vocab)


@pytest.mark.parametrize("vocab_size", [0, 100, 260])
def test_bad_vocab_size_names_the_value(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size} "):
        train_bpe(["hello"], vocab_size, SPECIAL_TOKENS)


def test_save_load_round_trip(bpe, tmp_path, texts):
    bpe.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["merges.txt", "vocab.json"]
    loaded = BPETokenizer.load(tmp_path)
    assert loaded.vocab == bpe.vocab and loaded.merges == bpe.merges
    assert loaded.special_tokens == SPECIAL_TOKENS
    assert loaded.encode(texts[0]) == bpe.encode(texts[0])


# ---------------------------------------------------------------- TinyTokenizerFast


def test_fast_tokenizer_specials(tok):
    assert [tok.eos_token, tok.bos_token, tok.pad_token] == SPECIAL_TOKENS[:3]
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    assert set(tok.all_special_tokens) == set(SPECIAL_TOKENS)
    assert len(tok) == VOCAB_SIZE
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # no bos/eos added
    assert tok.decode(tok("a<|im_end|>")["input_ids"], skip_special_tokens=True) == "a"


def test_fast_tokenizer_pads_right_with_pad(tok):
    batch = tok(["a", "a longer one"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id
    assert batch["attention_mask"][0][-1] == 0 and batch["attention_mask"][1][-1] == 1


def test_from_tokenizer_rejects_other_specials(bpe):
    backend = bpe.to_tokenizers()
    backend.add_special_tokens(["<|new|>"])
    TinyTokenizerFast.from_tokenizer(backend)  # extra tokens after ours are fine
    swapped = {**bpe.vocab, "<|bos|>": 0, "<|endoftext|>": 1}
    with pytest.raises(ValueError, match=re.escape("'<|endoftext|>' has id 1")):
        TinyTokenizerFast.from_tokenizer(BPETokenizer(swapped, bpe.merges, SPECIAL_TOKENS).to_tokenizers())


def test_save_pretrained_round_trip(tok, tmp_path, texts):
    tok.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(tmp_path))
    loaded = TinyTokenizerFast.from_pretrained(tmp_path)
    assert type(loaded) is TinyTokenizerFast
    assert loaded(texts[:5])["input_ids"] == tok(texts[:5])["input_ids"]
    assert loaded.all_special_ids == tok.all_special_ids and loaded.pad_token_id == 2
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.model_max_length == 512


CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]


def test_chat_template_two_turns(tok):
    expected = (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n"
    )
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == expected
    assert tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == tok(expected)["input_ids"]


def test_chat_template_generation_prompt(tok):
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_tokens_mask_covers_replies_and_their_end(tok):
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(kept) == "4.<|im_end|>6.<|im_end|>"


def test_auto_tokenizer_resolves_model_type_tiny(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    TinyConfig(vocab_size=VOCAB_SIZE).save_pretrained(tmp_path)
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is TinyTokenizerFast


# In the child: block `import tiny_hf` (the editable install would otherwise find it) so only the copied file can
# provide the class; offline, with a private modules cache, from a cwd outside the repository.
REMOTE_LOAD = """
import json, sys
sys.modules["tiny_hf"] = None
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"module": type(tok).__module__, "cls": type(tok).__name__,
                  "ids": tok(sys.argv[2])["input_ids"], "pad": tok.pad_token_id, "chat": tok.chat_template}))
"""


def test_remote_code_load_in_fresh_process(tok, tmp_path):
    folder = export_tokenizer(tok, tmp_path / "export")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][1] == "tokenization_tiny.TinyTokenizerFast"
    assert (folder / "tokenization_tiny.py").exists()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    text = "Hi <|im_end|> there, ünïcode 🤗"
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), text],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["cls"] == "TinyTokenizerFast" and got["module"].startswith("transformers_modules.")
    assert got["ids"] == tok(text)["input_ids"]
    assert got["pad"] == 2 and got["chat"] == CHAT_TEMPLATE
