"""training/synthetic.py: the synthetic retrieval sources are deterministic, split without overlap, named in data
specs like any source, and every answer they write is a copy of something earlier in the same document."""

import re

import datasets
import pytest

from tiny_hf.bpe import train_tokenizer
from tiny_hf.corpus import topic_documents
from training import synthetic
from training.data import build_datasets, load_documents, parse_data_spec

datasets.disable_progress_bars()


@pytest.mark.parametrize("source", list(synthetic.SYNTHETIC_SOURCES))
def test_sources_are_deterministic_and_split_without_overlap(source):
    train, validation = synthetic.synthetic_texts(source)
    assert (train, validation) == synthetic.synthetic_texts(source)
    assert len(train) == synthetic.DOCUMENTS["train"] and 0.9 * synthetic.DOCUMENTS["validation"] < len(validation)
    assert not set(train) & set(validation)
    docs = load_documents(source)
    assert list(docs["train"]["text"]) == train and list(docs["validation"]["text"]) == validation
    assert len(load_documents(source, val_fraction=0.0)["validation"]) == 0


def test_every_answer_is_a_copy_from_earlier_in_the_document():
    for text in synthetic.passkey_documents(50, seed=3):
        keys = re.findall(r"\d{4}", text)
        assert len(keys) == 3 and len(set(keys)) == 1 and text.endswith(f"{synthetic.QUESTION} {keys[0]}.")
        assert text.startswith(synthetic.INSTRUCTION)
    for text in synthetic.key_value_documents(50, seed=3):
        first, again = text.split("What is")[0].removeprefix("Remember these pass keys. ").split(" Once more: ")
        assert first == again.strip()
        listed = dict(re.findall(r"(\w+) (\d{4})\.", first))
        answered = re.findall(r"What is the pass key of (\w+)\? \1 (\d{4})\.", text)
        assert 2 <= len(listed) <= synthetic.MAX_PAIRS and sorted(answered) == sorted(listed.items())


def test_passkey_text_places_the_filler_and_checks_it():
    text = synthetic.passkey_text(1234, before=2, after=3, answer=False)
    before, after = text.split("The pass key is 1234.")
    assert before.endswith("The grass is green. The sky is blue. ")
    assert after.endswith("The sun is yellow. Here we go. There and back again. " + synthetic.QUESTION)
    assert synthetic.passkey_text(1234, 2, 3) == text + " 1234."
    with pytest.raises(ValueError, match="before=-1 and after=0 must be >= 0"):
        synthetic.passkey_text(1, -1, 0)
    with pytest.raises(ValueError, match=r"synthetic source 'needle' is not one of \['passkey', 'key-value'\]"):
        synthetic.synthetic_texts("needle")


def test_a_data_spec_mixes_them_with_text(tmp_path):
    texts = [d["text"] for d in topic_documents()[:30]]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    notes = tmp_path / "notes.txt"
    notes.write_text("\n<|endoftext|>\n".join(texts))
    assert parse_data_spec(f"{notes}:0.8,passkey:0.1,key-value:0.1")[1] == ("passkey", pytest.approx(0.1))
    train, validation = build_datasets(f"{notes}:0.8,passkey:0.1,key-value:0.1", tokenizer, 64, val_fraction=0.2)
    shares = {name: train["source"].count(name) / len(train) for name in ("passkey", "key-value")}
    assert all(0.05 < share < 0.15 for share in shares.values()), shares
    assert {"passkey", "key-value", str(notes)} == set(validation["source"])
