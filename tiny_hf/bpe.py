"""From-scratch byte-level BPE: a trainer and an encoder whose ids equal those of the `tokenizers` library.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units") starts from
single symbols and repeatedly merges the most frequent adjacent pair into a new symbol; encoding replays the merges in
the order they were learned. GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") runs
it on UTF-8 bytes, so every string has an encoding (no unknown token), after a regex has cut the text into words so
that no merge crosses a letter/number/punctuation/space boundary.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import regex
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from .tokenization_tiny import SPECIAL_TOKENS, TinyTokenizerFast

# GPT-2's pre-split: contractions, letter runs, number runs, punctuation runs, each with at most one leading space;
# the space before a word sticks to the word. The same pattern as tokenizers' ByteLevel(use_regex=True).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to chr(256 + n) in byte order,
    so every token is a printable string that vocab.json and merges.txt can hold (space is "Ġ", newline "Ċ").
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return dict(sorted(mapping.items()))


def _special_pattern(special_tokens: list[str]) -> regex.Pattern | None:
    # Longest first, so a special token that is a prefix of another never wins; the group keeps them in split().
    if not special_tokens:
        return None
    return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True)) + ")")


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each non-overlapping `a b`, left to right, by `new` ("a a a" with pair (a, a) gives "new a")."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], progress: bool = False
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges until the vocabulary has `vocab_size` tokens.

    Layout: the special tokens (ids 0..n-1), the 256 byte symbols in byte order, then one new token per merge, so
    `len(merges) == vocab_size - n - 256` (fewer only if the corpus runs out of pairs).

    Only the words containing the merged pair are touched after a merge, and the best pair comes from a heap whose
    stale entries are fixed when popped, so the cost per merge is the size of the affected words, not of the corpus:
    8,192 tokens on the 2.5 MB embedded corpus take ~1.5 s on one CPU core (bench/tokenizer_bench.py).

    Args:
        texts: training documents; special tokens inside them are cut out, never merged.
        vocab_size: the final vocabulary size, special tokens included.
        special_tokens: strings that get ids 0..n-1 and are never split.
        progress: show a tqdm bar over the merges.

    Returns:
        (vocab: token string -> id, merges: (left, right) token-string pairs in the order learned).
    """
    n_base = len(special_tokens) + 256
    if vocab_size < n_base:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {len(special_tokens)} special tokens + 256 "
            f"bytes = {n_base}"
        )
    byte_symbol = bytes_to_unicode()
    tokens = list(special_tokens) + [byte_symbol[b] for b in range(256)]  # id -> token string
    known = set(tokens)

    # 1. Count distinct pre-split words: the corpus has ~100x fewer distinct words than words.
    word_counts: Counter[str] = Counter()
    specials = _special_pattern(special_tokens)
    for text in texts:
        for chunk in specials.split(text)[::2] if specials else [text]:
            word_counts.update(GPT2_SPLIT.findall(chunk))
    words = [[len(special_tokens) + b for b in w.encode("utf-8")] for w in word_counts]  # as token ids
    freqs = list(word_counts.values())

    # 2. Count adjacent pairs, remembering which words hold each pair (a superset: members may go stale).
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += freq
            where[pair].add(i)
    # Max-heap on count; ties go to the smaller (left id, right id), which makes training deterministic.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=vocab_size - len(tokens), desc="bpe merges", unit="merge")
    while len(tokens) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count <= 0:
            continue
        if -neg_count != count:
            # Stale: the count only fell since this entry was pushed, so re-queue the true (lower) count.
            heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        merged = tokens[a] + tokens[b]
        if merged in known:
            # A different split of a string we already have. Greedy rank-order merging makes this very rare (not
            # seen on the embedded corpus nor on 20k random small corpora), but if it happens, skip the pair so
            # every merge adds exactly one token and no string has two ids (the tokenizers trainer reuses the id
            # instead). A zero count keeps it out: only pairs holding a newly made token are ever pushed again.
            pair_counts[pair] = 0
            continue
        new = len(tokens)
        tokens.append(merged)
        known.add(merged)
        merges.append((tokens[a], tokens[b]))

        # 3. Re-count only the affected words: remove all their old pairs, add all their new ones.
        grown = set()
        for i in where.pop(pair):
            word, freq = words[i], freqs[i]
            new_word = _merge_word(word, a, b, new)
            if len(new_word) == len(word):
                continue  # stale member: an earlier merge already consumed the pair in this word
            for p in pairwise(word):
                pair_counts[p] -= freq
            for p in pairwise(new_word):
                pair_counts[p] += freq
                if new in p:  # the only pairs that can be new or grow are those with the new token
                    where[p].add(i)
                    grown.add(p)
            words[i] = new_word
        for p in grown:
            heapq.heappush(heap, (-pair_counts[p], p))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return {token: i for i, token in enumerate(tokens)}, merges


class BPETokenizer:
    """Byte-level BPE encoder/decoder over a trained vocabulary and merge list (the GPT-2 algorithm).

    A word is encoded by repeatedly merging its adjacent pair with the lowest merge rank (the one learned first);
    special tokens in the text are matched first and become single ids. `to_tokenizers()` builds the equivalent
    `tokenizers.Tokenizer`, which gives the same ids.

    Args:
        vocab: token string -> id; specials first, then the 256 byte symbols, then one token per merge.
        merges: (left, right) token pairs, in the order learned (rank 0 first).
        special_tokens: tokens matched verbatim in the text and never split.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: list[str]):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = list(special_tokens)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.byte_encoder = bytes_to_unicode()
        byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        special = set(self.special_tokens)
        self.id_to_bytes = {
            i: token.encode("utf-8") if token in special else bytes(byte_decoder[ch] for ch in token)
            for token, i in self.vocab.items()
        }
        self._special_re = _special_pattern(self.special_tokens)
        # Natural text repeats a few thousand words over and over: caching per word is most of the speed.
        self._encode_word = functools.lru_cache(maxsize=1 << 16)(self._encode_word_uncached)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: list[str] | None = None,
        progress: bool = False,
    ) -> BPETokenizer:
        """Train on `texts` (see `train_bpe`); special tokens default to the model's `SPECIAL_TOKENS`."""
        special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        vocab, merges = train_bpe(texts, vocab_size, special_tokens, progress=progress)
        return cls(vocab, merges, special_tokens)

    def __len__(self) -> int:
        return len(self.vocab)

    def _encode_word_uncached(self, word: str) -> tuple[int, ...]:
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        ranks = self.ranks
        while len(symbols) > 1:
            best = min(pairwise(symbols), key=lambda p: ranks.get(p, len(ranks)))
            if best not in ranks:
                break  # no adjacent pair was ever merged
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.vocab[s] for s in symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids."""
        ids: list[int] = []
        chunks = self._special_re.split(text) if self._special_re else [text]
        for i, chunk in enumerate(chunks):
            if i % 2:  # split() with a group puts the matched special tokens at the odd positions
                ids.append(self.vocab[chunk])
            elif chunk:
                for word in GPT2_SPLIT.findall(chunk):
                    ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        return b"".join(self.id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Write `vocab.json` and `merges.txt` in the GPT-2 format (tokens never contain a space: it is "Ġ")."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False, indent=0)
        with open(out / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))

    @classmethod
    def load(cls, directory: str | os.PathLike, special_tokens: list[str] | None = None) -> BPETokenizer:
        """Read `vocab.json` + `merges.txt`; by default the ids before the 256 byte symbols are the specials."""
        src = Path(directory)
        with open(src / "vocab.json", encoding="utf-8") as f:
            vocab = json.load(f)
        with open(src / "merges.txt", encoding="utf-8") as f:
            merges = [tuple(line.split(" ")) for line in f.read().splitlines() if line and not line.startswith("#")]
        if special_tokens is None:
            by_id = sorted(vocab, key=vocab.get)
            special_tokens = by_id[: len(vocab) - 256 - len(merges)]
        return cls(vocab, merges, special_tokens)

    def to_tokenizers(self) -> Tokenizer:
        """The same tokenizer as a `tokenizers.Tokenizer` (Rust; what transformers runs), giving identical ids."""
        # ignore_merges=False: always apply merges, never look the whole word up first (Llama-3 style), as we do.
        tok = Tokenizer(models.BPE(vocab=dict(self.vocab), merges=list(self.merges), ignore_merges=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens(self.special_tokens)
        return tok

    def to_transformers(self, model_max_length: int = 2048) -> TinyTokenizerFast:
        """The model's `TinyTokenizerFast` (transformers), with our special tokens and ChatML chat template."""
        return TinyTokenizerFast.from_tokenizer(self.to_tokenizers(), model_max_length=model_max_length)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, model_max_length: int = 2048, progress: bool = False
) -> TinyTokenizerFast:
    """Train our BPE on `texts` and wrap it as the model's `TinyTokenizerFast` (ready for `save_pretrained`)."""
    return BPETokenizer.train(texts, vocab_size, progress=progress).to_transformers(model_max_length)
