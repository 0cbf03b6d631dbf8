"""Sampling: the request's parameters, and one next token per row from the logits of a batch.

Every row of a batch can ask for something else (greedy, temperature, top-k/p, min-p, repetition penalty, its own
seed), so each filter takes per-row tensors, and a seeded row draws from its own generator: its samples then do not
depend on the batch it happens to run in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop (the OpenAI parameters, plus top_k, min_p and seed).

    Args:
        max_tokens: Most tokens to generate; None = until the context window is full.
        temperature: 0 = greedy (argmax); else logits are divided by it before sampling.
        top_k: Keep the k most likely tokens (0 = all).
        top_p: Keep the smallest set of tokens whose probability adds up to top_p (nucleus sampling).
        min_p: Drop tokens less likely than min_p x the top token's probability.
        repetition_penalty: >1 discourages tokens already in the prompt or output (CTRL, Keskar et al. 2019).
        stop: Strings that end generation; the text returned stops before them.
        stop_token_ids: Token ids that end generation, besides the tokenizer's eos (unless `ignore_eos`).
        ignore_eos: Keep going past eos (benchmarks use it to generate exactly `max_tokens`).
        seed: Seeds this request's own random generator, so its samples do not depend on the batch it runs in.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        checks = {
            "max_tokens": self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "temperature": 0 <= self.temperature <= 100,
            "top_k": isinstance(self.top_k, int) and self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p <= 1,
            "repetition_penalty": 0 < self.repetition_penalty <= 10,
            "stop": all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
            "stop_token_ids": all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
        }
        allowed = {
            "max_tokens": "None or an integer >= 1",
            "temperature": "in [0, 100]",
            "top_k": "an integer >= 0",
            "top_p": "in (0, 1]",
            "min_p": "in [0, 1]",
            "repetition_penalty": "in (0, 10]",
            "stop": "at most 16 non-empty strings",
            "stop_token_ids": "non-negative integers",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed[name]}")
        self.stop, self.stop_token_ids = tuple(self.stop), tuple(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: for tokens already seen, divide positive logits by the penalty and
    multiply negative ones by it. logits/seen (B, V), penalty (B, 1)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(
    logits: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Top-k, then top-p (Holtzman et al. 2020), then min-p (Nguyen et al. 2024), per row: masked logits are -inf.
    logits (B, V) already divided by the temperature; top_k (B,) with 0 = off, top_p/min_p (B,)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(vocab, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    remove = ranks >= k
    probs = sorted_logits.masked_fill(remove, -math.inf).softmax(-1)
    # top-p: drop a token when the probability mass before it already reaches top_p (the first is always kept).
    remove |= ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    probs = sorted_logits.masked_fill(remove, -math.inf).softmax(-1)
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(remove, -math.inf))


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs (B, V), by inverse CDF: the first token whose cumulative probability exceeds
    u x total, with u ~ U[0, 1) drawn from the row's generator (None: the global one). One random number per row,
    where `torch.multinomial` draws one per vocabulary entry (slow for a batch of seeded rows on a CPU). Float64 keeps
    u x total below the total, so a token of probability 0 is never picked."""
    u = torch.stack([torch.rand((), dtype=torch.float64, device=probs.device, generator=g) for g in generators])
    cdf = probs.double().cumsum(-1)  # (B, V)
    tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]  # (B,)
    return tokens.clamp(max=probs.shape[-1] - 1)


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: torch.Tensor | None = None,
) -> list[int]:
    """The next token of each row of logits (B, V) under that row's `params`; `seen` (B, V) marks the tokens the
    repetition penalty applies to."""
    device = logits.device
    penalties = [p.repetition_penalty for p in params]
    if seen is not None and any(p != 1.0 for p in penalties):
        logits = apply_repetition_penalty(logits, seen, torch.tensor(penalties, device=device)[:, None])
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        p = [params[i] for i in rows]
        scaled = logits[rows] / torch.tensor([x.temperature for x in p], device=device)[:, None]
        if any(x.top_k or x.top_p < 1 or x.min_p > 0 for x in p):
            scaled = filter_logits(
                scaled,
                top_k=torch.tensor([x.top_k for x in p], device=device),
                top_p=torch.tensor([x.top_p for x in p], device=device),
                min_p=torch.tensor([x.min_p for x in p], device=device),
            )
        tokens[rows] = sample(F.softmax(scaled, dim=-1), [generators[i] for i in rows])
    return tokens.tolist()
