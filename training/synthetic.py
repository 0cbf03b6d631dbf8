"""Synthetic retrieval documents: a share of them in pretraining is meant to teach a tiny model to copy from context.

Two offline, deterministic sources that `--data` names like any other ("embedded:0.6,passkey:0.2,key-value:0.2"):
- `passkey`: the passkey task of Mohtashami & Jaggi (2023) with its answer written out: an instruction, filler
  sentences, "The pass key is 4821. Remember it. 4821 is the pass key.", more filler, then "What is the pass key?
  The pass key is 4821." training/long_context.py builds its test prompts with the same `passkey_text`, minus the
  answer, so the model is asked in exactly the format it was trained on;
- `key-value`: a list of named keys ("river 4821."), read twice, then a question about each, the
  associative-recall task of the induction-head studies (Olsson et al. 2022; Zoology, Arora et al. 2023).

The circuit both reward is an induction head (a previous-token head plus a head that attends to the token after an
earlier match of the current one, then copies it): every answer is the token sequence that followed the question's
last words earlier in the document. The filler is the same five sentences (cheap to predict, so the loss that is left
sits on the keys); names are one token each and sit right before their key, so the key-value copy needs a one-token
match; keys are 4-digit numbers (one to four tokens). Measured (docs/08): tiny-3m trained 400 steps (1.6M tokens) on
embedded:0.6,passkey:0.2,key-value:0.2 had only begun to copy (the repeated list's keys 0.2 nats below the first
list's) and retrieved no passkey; the phase change that forms induction heads needs more training than that.

Documents are at most about 130 tokens with an 8k BPE of the embedded corpus (filler sentences cost ~7 tokens each),
so many of them fit in a 128-token training block; how far apart needle and question are is spread evenly over that
range. Train and validation documents come from separate seeds and never share a text.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Mohtashami & Jaggi's filler, sentence by sentence (prompts cut it at sentence ends)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
INSTRUCTION = "There is an important number hidden in a lot of irrelevant text. Find it and remember it."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1000, 9999)  # 4-digit keys, as in the passkey literature: a guess is right 1 time in 9,000
# Names that are one token each (with the leading space) in an 8k BPE of the embedded corpus, so the key that
# follows a name is a one-token induction copy.
NAMES = (
    "file", "list", "table", "window", "button", "color", "server", "client", "socket", "thread", "queue", "stack",
    "tree", "node", "graph", "image", "cache", "logger", "parser", "record", "frame", "widget", "canvas", "turtle",
    "mail", "clock", "calendar", "number", "light", "letter", "circle", "square", "engine", "wheel",
)  # fmt: skip
MAX_FILLER = 10  # filler sentences per passkey document, at most (~125 tokens with an 8k BPE of the embedded corpus)
MAX_PAIRS = 4  # named keys per key-value document, at most (~150 tokens with every question)
DOCUMENTS = {"train": 4000, "validation": 200}  # ~350k training tokens: more than a few minutes of training draw
SEEDS = {"train": 0, "validation": 1}


def filler(count: int, start: int = 0) -> list[str]:
    """`count` filler sentences, cycling through FILLER_SENTENCES from sentence `start`."""
    return [FILLER_SENTENCES[(start + i) % len(FILLER_SENTENCES)] for i in range(count)]


def passkey_text(key: int, before: int, after: int, answer: bool = True) -> str:
    """A passkey document: the instruction, `before` filler sentences, the key sentence, `after` more, the question
    and (when `answer`) the key after it. Without the answer it is the test prompt, ending in QUESTION.

    Args:
        key: the number to hide.
        before: filler sentences between the instruction and the key sentence.
        after: filler sentences between the key sentence and the question (the filler continues its cycle).
        answer: end with " {key}." (training documents) or stop at the question (prompts).
    """
    if before < 0 or after < 0:
        raise ValueError(f"before={before} and after={after} must be >= 0 filler sentences")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    parts = [INSTRUCTION, *filler(before), needle, *filler(after, start=before), QUESTION]
    return " ".join(parts) + (f" {key}." if answer else "")


def key_value_text(pairs: list[tuple[str, int]], order: list[int]) -> str:
    """A key-value document: the (name, key) list, the same list once more, then a question about each pair in
    `order`, answered. The name sits right before its key, so every key after the first list is a one-token
    induction copy (the token that followed this name before), the circuit the passkey prompts need.

    Args:
        pairs: (name, key) pairs, names distinct.
        order: the indices of the pairs asked about, in the order asked.
    """
    listed = " ".join(f"{name} {key}." for name, key in pairs)
    lines = ["Remember these pass keys.", listed, "Once more:", listed]
    for i in order:
        name, key = pairs[i]
        lines.append(f"What is the pass key of {name}? {name} {key}.")
    return " ".join(lines)


def passkey_documents(count: int, seed: int) -> list[str]:
    """`count` passkey documents: random keys, 0..MAX_FILLER filler sentences in all, the key at a random depth."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        total = rng.randint(0, MAX_FILLER)
        before = rng.randint(0, total)
        texts.append(passkey_text(rng.randint(*KEY_RANGE), before, total - before))
    return texts


def key_value_documents(count: int, seed: int) -> list[str]:
    """`count` key-value documents: 2..MAX_PAIRS distinct names with random keys, each asked for in random order."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        names = rng.sample(NAMES, rng.randint(2, MAX_PAIRS))
        pairs = [(name, rng.randint(*KEY_RANGE)) for name in names]
        texts.append(key_value_text(pairs, rng.sample(range(len(pairs)), len(pairs))))
    return texts


# The data-spec names of the synthetic sources; each maker takes (count, seed) and returns that many texts.
SYNTHETIC_SOURCES: dict[str, Callable[[int, int], list[str]]] = {
    "passkey": passkey_documents,
    "key-value": key_value_documents,
}


def synthetic_texts(source: str) -> tuple[list[str], list[str]]:
    """(train, validation) texts of a synthetic source, the same on every call and machine.

    Args:
        source: one of SYNTHETIC_SOURCES.
    """
    if source not in SYNTHETIC_SOURCES:
        raise ValueError(f"synthetic source {source!r} is not one of {list(SYNTHETIC_SOURCES)}")
    make = SYNTHETIC_SOURCES[source]
    train = make(DOCUMENTS["train"], SEEDS["train"])
    seen = set(train)
    validation = [text for text in make(DOCUMENTS["validation"], SEEDS["validation"]) if text not in seen]
    return train, validation
