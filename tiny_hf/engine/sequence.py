"""A request's life in the engine: its prompt, parameters, slot and output so far, and what the engine hands back.

A request moves waiting -> prefilling (its prompt computed chunk by chunk into its cache slot) -> decoding (one token
per step) -> finished; `num_computed` counts the tokens whose keys and values are in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")


class ContextWindowError(ValueError):
    """A request that cannot fit the context window under the engine's policy."""


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_queue`: the caller should retry later (HTTP 429)."""


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    generator: torch.Generator | None = None
    slot: int = -1
    num_computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded output so far (stop strings cut off)
    sent: int = 0  # characters of `text` already streamed
    prefix_offset: int = 0  # incremental detokenization: output_ids[prefix_offset:read_offset] is already in `text`
    read_offset: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and the new text (a delta), or the final state."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
