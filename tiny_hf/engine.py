"""A from-scratch inference engine: preallocated KV cache, continuous batching, prefix caching, sampling, streaming.

`model.generate()` is correct but spends most of each step in Python (logits processors, a growing DynamicCache,
stopping criteria), and it runs one batch from start to end. This engine is how serving systems (Orca, Yu et al.
2022; vLLM, Kwon et al. 2023) work instead, small enough to read in one sitting:

- **KV cache, preallocated** (`SlotKVCache`): one slot of `max_seq_len` keys/values per running sequence, written in
  place, so a decode step costs one token of compute and no allocation.
- **Prefill then decode**: prompts are computed in chunks (at most `token_budget` tokens per step; the prompts of a
  step share one right-padded forward), then each step adds one token per running sequence in a single batched
  forward.
- **Continuous batching**: requests join the running batch as soon as a slot frees up and leave it the step they
  finish; a bounded FIFO queue holds the rest (`QueueFullError` when full).
- **Prefix caching**: the KV of full 16-token blocks of every prompt is kept (LRU); a later prompt that starts with
  the same blocks (a system prompt, a chat history) copies them instead of recomputing.
- **Context-window policies** (`WINDOW_POLICIES`): "reject" a request that does not fit, "truncate" the oldest
  tokens (chat: the oldest turns, keeping the system prompt), or "sliding" for models configured with a
  `sliding_window`, whose cache then becomes a ring buffer.

What it needs from a model (every `TinyForCausalLM`, also when loaded through remote code): `model.model` with
`embed_tokens`, `add_positions(embeds, position_ids)`, `layers` (each called as
`layer(h, attention_bias=..., position_embeddings=..., cache=...)` and calling `cache.update(k, v, layer_idx)`),
`norm`, `alibi_slopes`, and `model.lm_head`. For other models use `generate()`.

    engine = Engine.from_pretrained("runs/demo/model")
    print(engine.generate(["The json module"], SamplingParams(max_tokens=20, temperature=0))[0].text)
    for delta in engine.stream("A dictionary is", SamplingParams(max_tokens=20)):
        print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

WINDOW_POLICIES = ("reject", "truncate", "sliding")
FINISH_REASONS = ("stop", "length", "abort")
PREFIX_BLOCK = 16  # tokens per prefix-cache block


class ContextWindowError(ValueError):
    """A request that cannot fit the context window under the engine's policy."""


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_queue`: the caller should retry later (HTTP 429)."""


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


@dataclass
class _Request:
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


# ---------------------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------------------
class SlotKVCache:
    """Keys and values of up to `num_slots` sequences, preallocated as (slots, kv_heads, max_len, head_dim) per layer.

    The engine `bind`s it before each forward (which rows, where the new tokens go, how many keys to return), and
    every attention layer then calls `update(k, v, layer_idx)`: the new keys/values are written in place and the
    rows' first `kv_len` entries come back (a view when the rows are a slice, as for the decoding rows [0, n); a copy
    when they are a list of slots, as for the prompts prefilled together). `positions` records the position each entry
    holds (-1: empty), which is what the attention mask is built from, so a ring buffer (sliding window) needs no
    special case.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.positions = torch.full((num_slots, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self._rows, self._batch_index, self._write_index, self._kv_len = slice(0, 0), None, None, 0

    def bind(
        self, rows: slice | torch.Tensor, write_index: torch.Tensor, write_positions: torch.Tensor, kv_len: int
    ) -> None:
        """Prepare a forward over cache rows `rows` (a slice, or slot indices (B,)) whose new tokens go to
        `write_index` (B, Q)."""
        self._rows, self._write_index, self._kv_len = rows, write_index, kv_len
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=write_index.device)
        self._batch_index = rows[:, None]  # (B, 1): the slot of each row
        self.positions[self._batch_index, write_index] = write_positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, ...]:
        """Write key/value (B, Hkv, Q, D) at the bound places; return the rows' (B, Hkv, kv_len, D) keys and values."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._batch_index, :, self._write_index] = key.transpose(1, 2)  # (B, Q, Hkv, D)
        values[self._batch_index, :, self._write_index] = value.transpose(1, 2)
        return keys[self._rows, :, : self._kv_len], values[self._rows, :, : self._kv_len]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's first `length` entries from slot `src` to slot `dst`."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
        self.positions[dst] = -1
        self.positions[dst, :length] = self.positions[src, :length]

    def swap_slots(self, a: int, b: int) -> None:
        for tensor in [*self.keys, *self.values, self.positions]:
            tensor[[a, b]] = tensor[[b, a]]

    def read_block(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of entries [start, end) of a slot, all layers: two (layers, Hkv, end - start, D)."""
        return (
            torch.stack([k[slot, :, start:end] for k in self.keys]),
            torch.stack([v[slot, :, start:end] for v in self.values]),
        )

    def write_block(self, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = start + keys.shape[2]
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            k[slot, :, start:end] = keys[layer]
            v[slot, :, start:end] = values[layer]
        self.positions[slot, start:end] = torch.arange(start, end, device=self.positions.device)


class PrefixCache:
    """Keys/values of full prompt blocks, keyed by the hash of the block's tokens *and everything before it*, so a hit
    means the whole prefix matches (vLLM's automatic prefix caching). Least recently used blocks are evicted."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self.blocks: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.queries = 0  # in blocks

    @staticmethod
    def block_hashes(token_ids: Sequence[int]) -> list[int]:
        hashes, parent = [], 0
        for start in range(0, len(token_ids) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
            parent = hash((parent, tuple(token_ids[start : start + PREFIX_BLOCK])))
            hashes.append(parent)
        return hashes

    def lookup(self, hashes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached blocks for the longest cached run of `hashes` from the start."""
        found = []
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            found.append(self.blocks[h])
        self.queries += len(hashes)
        self.hits += len(found)
        return found

    def insert(self, h: int, block: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.blocks[h] = block
        self.blocks.move_to_end(h)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------
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
    u x total, with u ~ U[0, 1) drawn from the row's generator (None: the global one). A seeded request's samples then
    depend only on its seed and its logits, never on the batch it runs in. One random number per row, where
    `torch.multinomial` draws one per vocabulary entry: that is what made a batch of seeded requests slow on a CPU.
    Float64 keeps u x total below the total, so a token of probability 0 is never picked."""
    u = torch.stack([torch.rand((), dtype=torch.float64, device=probs.device, generator=g) for g in generators])
    cdf = probs.double().cumsum(-1)  # (B, V)
    tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]  # (B,)
    return tokens.clamp(max=probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------------------------------
# Context window
# ---------------------------------------------------------------------------------------------------------------------
def fit_messages(tokenizer, messages: list[dict], *, budget: int, policy: str) -> tuple[list[int], int]:
    """Apply the chat template; if the prompt is longer than `budget` tokens, "truncate" drops the oldest turns after
    the system prompt (never the last message) until it fits, and "reject" raises `ContextWindowError`.

    Returns:
        The prompt ids and how many messages were dropped.
    """
    if policy not in WINDOW_POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {list(WINDOW_POLICIES)}")

    def encode(msgs):
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))

    ids, dropped = encode(messages), 0
    if policy != "truncate":
        return ids, 0  # "reject" and "sliding" are the engine's to apply
    kept = list(messages)
    first = 1 if kept and kept[0].get("role") == "system" else 0
    while len(ids) > budget and len(kept) - first > 1:
        del kept[first]
        dropped += 1
        ids = encode(kept)
    if len(ids) > budget:
        raise ContextWindowError(
            f"the prompt is {len(ids)} tokens even with only the system prompt and the last message; the budget is "
            f"{budget} tokens"
        )
    return ids, dropped


# ---------------------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------------------
ENGINE_MODULES = ("embed_tokens", "add_positions", "layers", "norm")  # what the engine calls on model.model


class Engine:
    """Continuous-batching inference for a `TinyForCausalLM` (see the module docstring for what a model needs).

    Args:
        model: The causal LM, in eval mode, on its device.
        tokenizer: Its tokenizer (for prompts given as text, stop strings and streamed text).
        max_batch_size: Sequences decoded together (cache slots).
        max_seq_len: Context window per sequence (prompt + output); defaults to `max_position_embeddings`.
        token_budget: Most prompt tokens computed per step (chunked prefill), so long prompts do not stall decoding.
        max_queue: Requests that may wait for a slot; one more raises `QueueFullError`.
        prefix_cache_tokens: Prompt tokens whose KV is kept for reuse (0 turns prefix caching off).
        window_policy: What to do with a prompt that does not fit: one of WINDOW_POLICIES.
        cuda_graphs: Replay each decode step as a CUDA graph (default: on when the model is on a GPU).
        static_decode: Decode with the fixed shapes CUDA graphs need, without capturing them (what the graphs run,
            testable on a CPU). Not used with the sliding ring or dynamic NTK RoPE.
        compile: Compile the static decode step with torch.compile (inductor; on CPU with its C++ wrapper, so a
            step runs without Python between kernels): what makes batch-1 decoding fast on a CPU, where there are
            no CUDA graphs. Costs a compilation per padded batch size on first use. Implies static_decode.
    """

    @staticmethod
    def supports(model) -> bool:
        """Whether the engine can run `model`: a TinyForCausalLM-style LM (layers, norm and positions reachable)."""
        inner = getattr(model, "model", None)
        return all(hasattr(inner, name) for name in ENGINE_MODULES) and hasattr(model, "lm_head")

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        token_budget: int = 512,
        max_queue: int = 256,
        prefix_cache_tokens: int = 4096,
        window_policy: str = "reject",
        cuda_graphs: bool | None = None,
        static_decode: bool = False,
        compile: bool = False,
    ):
        config = model.config
        max_seq_len = self._check_arguments(model, window_policy, max_seq_len, max_batch_size, token_budget, max_queue)
        self.sliding_window = getattr(config, "sliding_window", None)
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.max_batch_size, self.max_seq_len, self.max_queue = max_batch_size, max_seq_len, max_queue
        self.token_budget, self.window_policy = token_budget, window_policy
        self.ring = window_policy == "sliding"
        # A prefill chunk must not overwrite ring entries its own first query still needs.
        self.chunk_limit = min(token_budget, max_seq_len - self.sliding_window) if self.ring else token_budget
        self.cache = SlotKVCache(
            num_layers=config.num_hidden_layers,
            num_slots=max_batch_size,
            num_kv_heads=config.num_key_value_heads,
            max_len=max_seq_len,
            head_dim=config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.prefix_cache = PrefixCache(prefix_cache_tokens // PREFIX_BLOCK) if prefix_cache_tokens else None
        self.seen = torch.zeros(max_batch_size, config.vocab_size, dtype=torch.bool, device=self.device)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {eos if eos is not None else config.eos_token_id} - {None}
        self.slopes = getattr(model.model, "alibi_slopes", None)
        self.dynamic_rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None) == "dynamic"
        self._set_decode_mode(cuda_graphs, static_decode, compile)

        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []  # admitted, prompt not fully computed; in arrival order
        self.decoding: list[_Request] = []  # decoding[i].slot == i: the batch is the contiguous rows [0, n)
        self.slot_owner: list[_Request | None] = [None] * max_batch_size
        self.requests: dict[str, _Request] = {}
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self.stats = {
            "requests": 0,
            "finished": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "generated_tokens": 0,
            "steps": 0,
        }
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) per step, for tokens/s

    @classmethod
    def _check_arguments(cls, model, window_policy, max_seq_len, max_batch_size, token_budget, max_queue) -> int:
        """Refuse a model or settings the engine cannot serve, before anything is allocated; returns the window."""
        config = model.config
        if not cls.supports(model):
            raise TypeError(
                f"the engine runs TinyForCausalLM-style models (model.model needs {list(ENGINE_MODULES)} and the "
                f"model an lm_head; {type(model).__name__} lacks them): use model.generate() for this one"
            )
        if window_policy not in WINDOW_POLICIES:
            raise ValueError(f"window_policy={window_policy!r} is not one of {list(WINDOW_POLICIES)}")
        sliding_window = getattr(config, "sliding_window", None)
        if window_policy == "sliding":
            if not sliding_window:
                raise ValueError("window_policy='sliding' needs a model configured with a sliding_window")
            if config.position_embedding in ("learned", "sinusoidal"):
                raise ValueError("window_policy='sliding' needs relative positions (rope, alibi or none)")
        max_seq_len = max_seq_len or config.max_position_embeddings
        if config.position_embedding in ("learned", "sinusoidal") and max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len={max_seq_len} is beyond the {config.position_embedding!r} position table "
                f"({config.max_position_embeddings} positions)"
            )
        if window_policy == "sliding" and max_seq_len < sliding_window + 16:
            raise ValueError(f"max_seq_len={max_seq_len} must exceed sliding_window={sliding_window} by >= 16")
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("token_budget", token_budget),
            ("max_queue", max_queue),
            ("max_seq_len", max_seq_len),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        return max_seq_len

    def _set_decode_mode(self, cuda_graphs: bool | None, static_decode: bool, compile: bool) -> None:
        """The decode step: eager, static (fixed shapes), CUDA-graphed or compiled, as the device and model allow."""
        # Decode with fixed shapes (batch padded to a power of two, keys over the whole window) so that each step is
        # one CUDA-graph replay: on a GPU the Python and launch overhead of ~100 small kernels per token is what
        # limits batch-1 speed (FACTS: 13.6 ms eager vs 1.3 ms graphed per token for GPT-2 small).
        # Not for the sliding ring or dynamic NTK RoPE, whose shapes or tables change from step to step.
        on_gpu = self.device.type == "cuda"
        static_ok = not (self.ring or self.dynamic_rope)
        graphs_ok = on_gpu and static_ok
        self.cuda_graphs = graphs_ok if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not graphs_ok:
            raise ValueError(
                "cuda_graphs=True needs the model on a CUDA device, and neither the sliding policy nor dynamic RoPE"
            )
        if compile and not static_ok:
            raise ValueError(
                "compile=True needs the static decode step, which the sliding policy and dynamic RoPE cannot use"
            )
        self.static_decode = (static_decode or self.cuda_graphs or compile) and static_ok
        self._graphs: dict[int, tuple] = {}  # padded batch size -> (graph, ids, positions, logits)
        if compile:
            # dynamic=False: one graph per padded batch size, the shapes the static step already fixes.
            options = {"cpp_wrapper": True} if not on_gpu else None
            self._static_forward = torch.compile(self._static_forward, dynamic=False, options=options)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> Engine:
        """Load a run folder or Hub id through the Auto classes: fp32 on CPU, bf16 on a GPU."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model.to(device), tokenizer, **kwargs)

    # -- requests -----------------------------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request (text, or token ids); returns its id. Raises ContextWindowError or QueueFullError."""
        return self.enqueue(self.make_request(prompt, params, request_id))

    def make_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> _Request:
        """Tokenize and check a request against the window policy, without touching the engine's state (so another
        thread may call it while a step runs)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs the engine to have a tokenizer; pass token ids")
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        ids = self._fit(ids, params)
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return _Request(request_id, ids, params, time.perf_counter(), generator)

    def enqueue(self, request: _Request) -> str:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests); retry later")
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.stats["requests"] += 1
        return request.request_id

    def _fit(self, ids: list[int], params: SamplingParams) -> list[int]:
        """Apply the window policy to a prompt (token ids)."""
        window, wanted = self.max_seq_len, params.max_tokens or 0
        if self.ring or len(ids) + wanted <= window and len(ids) < window:
            return ids
        if self.window_policy == "truncate":
            keep = window - max(wanted, min(256, window // 4))
            if keep < 1:
                raise ContextWindowError(
                    f"max_tokens={wanted} leaves no room for a prompt in the {window}-token window"
                )
            return ids[-keep:]
        raise ContextWindowError(
            f"this model's context window is {window} tokens, but the request needs {len(ids) + wanted} "
            f"({len(ids)} in the prompt, {wanted} for the completion); shorten the prompt or lower max_tokens"
        )

    def abort(self, request_id: str) -> None:
        """Cancel a request (a client went away); its slot is freed at the next step."""
        if request_id in self.requests:
            self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def metrics(self) -> dict:
        """Queue length, running requests, recent tokens/s, prefix-cache hit rate and totals."""
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > 10:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        tokens = sum(n for _, n in list(self._recent)[1:])
        cache = self.prefix_cache
        return {
            "queue_length": len(self.waiting),
            "running": len(self.prefilling) + len(self.decoding),
            "tokens_per_second": tokens / span if span > 0 else 0.0,
            "prefix_cache_hit_rate": cache.hits / cache.queries if cache and cache.queries else 0.0,
            **self.stats,
        }

    # -- the step -----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling step: drop aborted requests, admit waiting ones into free slots, decode one token for every
        running sequence, and spend the rest of the token budget on prompt chunks. Returns the step's outputs."""
        outputs: list[RequestOutput] = []
        for request_id in list(self._aborted):
            request = self.requests.get(request_id)
            if request is not None:
                outputs.append(self._finish(request, "abort"))
        self._aborted.clear()

        if self.decoding:
            outputs += self._decode()
        budget = self.token_budget - len(self.decoding)
        self._admit()
        chunks = []  # (request, prompt tokens to compute this step), first come first served
        for request in self.prefilling:
            if budget <= 0:
                break
            chunk = min(budget, self.chunk_limit, len(request.prompt_ids) - request.num_computed)
            budget -= chunk
            chunks.append((request, chunk))
        if chunks:
            outputs += self._prefill(chunks)
        self.stats["steps"] += 1
        self._recent.append((time.perf_counter(), sum(len(o.token_ids) for o in outputs)))
        return outputs

    def _admit(self) -> None:
        """Move waiting requests into free slots (FIFO), reusing cached prefix blocks."""
        while self.waiting and None in self.slot_owner:
            request = self.waiting.popleft()
            # The lowest free slot: prompts finish in arrival order, so each usually finishes in the very slot it
            # moves to as a decoding row (len(self.decoding)), and no keys/values need copying.
            slot = self.slot_owner.index(None)
            request.slot, self.slot_owner[slot] = slot, request
            self.cache.positions[slot] = -1
            self.seen[slot] = False
            self.seen[slot, request.prompt_ids] = True
            if self.prefix_cache is not None and not self.ring:
                # Reuse whole blocks only, and leave at least one prompt token to compute (its logits are needed).
                hashes = PrefixCache.block_hashes(request.prompt_ids[: len(request.prompt_ids) - 1])
                for i, (keys, values) in enumerate(self.prefix_cache.lookup(hashes)):
                    self.cache.write_block(slot, i * PREFIX_BLOCK, keys.to(self.device), values.to(self.device))
                    request.num_computed += PREFIX_BLOCK
                self.stats["cached_prompt_tokens"] += request.num_computed
            self.stats["prompt_tokens"] += len(request.prompt_ids)
            self.prefilling.append(request)

    def _forward(
        self,
        rows: slice | torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model on cache rows `rows` (a slice or slot indices) for input_ids/positions (B, Q), where position
        -1 marks a padding query; returns fp32 logits (B, V) of each row's query `last_index` (B,) (default: the last).

        A padding query sees no key, and its key goes to the window's last entry, marked empty: outside the ring no
        sequence ever uses that entry (a prompt ends before it and decoding stops before it). `_group_chunks` keeps
        padding away from the ring."""
        cache, model = self.cache, self.model.model
        write_index = positions % cache.max_len  # the ring wraps; -1 (padding) lands on the last entry
        kv_len = min(int(positions.max()) + 1, cache.max_len)
        cache.bind(rows, write_index, positions, kv_len)
        hidden = model.embed_tokens(input_ids)
        query_positions, positions = positions, positions.clamp(min=0)  # padding rows embed as position 0
        if self.dynamic_rope and input_ids.shape[0] > 1:
            # Dynamic NTK scales by the longest position of a call: per row, as each sequence alone would get.
            parts = [model.add_positions(hidden[i : i + 1], positions[i : i + 1]) for i in range(hidden.shape[0])]
            hidden = torch.cat([h for h, _ in parts])
            position_embeddings = tuple(torch.cat(t) for t in zip(*(pe for _, pe in parts), strict=True))
        else:
            hidden, position_embeddings = model.add_positions(hidden, positions)
        bias = self._attention_bias(cache.positions[rows, :kv_len], query_positions)
        for layer in model.layers:
            hidden, _ = layer(hidden, attention_bias=bias, position_embeddings=position_embeddings, cache=cache)
        if last_index is None:
            hidden = hidden[:, -1]  # (B, hidden)
        else:
            hidden = hidden[torch.arange(hidden.shape[0], device=self.device), last_index]  # (B, hidden)
        return self.model.lm_head(model.norm(hidden)).float()  # (B, V)

    def _attention_bias(self, key_positions: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor | None:
        """Additive bias (B, 1 or H, Q, K) from the positions the keys hold and the queries' positions: a query sees
        written keys at or before it (within the sliding window); ALiBi adds -slope x distance. None when every key is
        visible to every query and there is no ALiBi (the fused kernels then run unmasked)."""
        qp, kp = query_positions[:, :, None], key_positions[:, None, :]  # (B, Q, 1), (B, 1, K)
        allowed = (kp >= 0) & (kp <= qp)
        if self.sliding_window:
            allowed &= qp - kp < self.sliding_window
        if self.slopes is None and bool(allowed.all()):
            return None
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        bias = bias.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]  # (B, 1, Q, K)
        if self.slopes is not None:
            distance = (qp - kp).clamp(min=0).to(self.dtype)[:, None]  # (B, 1, Q, K)
            bias = (bias - self.slopes.to(self.dtype)[None, :, None, None] * distance).clamp(
                min=torch.finfo(self.dtype).min
            )
        return bias

    def _prefill(self, chunks: list[tuple[_Request, int]]) -> list[RequestOutput]:
        """Compute the next `chunk` tokens of each request's prompt, many prompts per forward (right-padded: one
        forward of B x longest chunk instead of B forwards, whose fixed per-call cost dominates for short prompts),
        then move the requests whose prompt is complete into the decoding rows and sample their first tokens."""
        last_logits = {}  # request id -> logits (V,) of its prompt's last token
        for group in self._group_chunks(chunks):
            width = max(chunk for _, chunk in group)
            ids, positions = [], []
            for request, chunk in group:
                start, pad = request.num_computed, width - chunk
                ids.append(request.prompt_ids[start : start + chunk] + [0] * pad)
                positions.append(list(range(start, start + chunk)) + [-1] * pad)
            logits = self._forward(
                torch.tensor([request.slot for request, _ in group], device=self.device),
                torch.tensor(ids, device=self.device),
                torch.tensor(positions, device=self.device),
                last_index=torch.tensor([chunk - 1 for _, chunk in group], device=self.device),
            )
            for row, (request, chunk) in enumerate(group):
                request.num_computed += chunk
                if request.num_computed == len(request.prompt_ids):
                    last_logits[request.request_id] = logits[row]
        done = [request for request, _ in chunks if request.request_id in last_logits]  # in arrival order
        for request in done:
            self._remember_prefix(request)
            self._start_decoding(request)
        if not done:
            return []
        return self._accept(done, torch.stack([last_logits[r.request_id] for r in done]))

    def _group_chunks(self, chunks: list[tuple[_Request, int]]) -> list[list[tuple[_Request, int]]]:
        """Split a step's prompt chunks into forwards: longest first, a group grows while its padded size (rows x
        longest chunk) stays within `token_budget`, so padding never costs more than the budget allows. With the
        ring cache each prompt gets its own forward: a padding key would overwrite a live ring entry."""
        if self.ring:
            return [[c] for c in chunks]
        groups: list[list[tuple[_Request, int]]] = []
        for request, chunk in sorted(chunks, key=lambda c: -c[1]):
            if groups and (len(groups[-1]) + 1) * groups[-1][0][1] <= self.token_budget:
                groups[-1].append((request, chunk))
            else:
                groups.append([(request, chunk)])
        return groups

    def _start_decoding(self, request: _Request) -> None:
        """The prompt is in the cache: move the request into the decoding rows [0, n)."""
        slot = request.slot
        self.prefilling.remove(request)
        target = len(self.decoding)
        if slot != target:
            other = self.slot_owner[target]
            if other is None:
                self.cache.copy_slot(slot, target, min(request.num_computed, self.max_seq_len))
                self.seen[target] = self.seen[slot]
            else:  # another prompt is being computed in the target slot: trade places
                self.cache.swap_slots(slot, target)
                self.seen[[slot, target]] = self.seen[[target, slot]]
                other.slot, self.slot_owner[slot] = slot, other
            if self.slot_owner[slot] is request:
                self.slot_owner[slot] = None
            request.slot, self.slot_owner[target] = target, request
        self.decoding.append(request)

    def _remember_prefix(self, request: _Request) -> None:
        if self.prefix_cache is None or self.ring:
            return
        hashes = PrefixCache.block_hashes(request.prompt_ids)
        for i, h in enumerate(hashes):
            if h not in self.prefix_cache.blocks:
                block = self.cache.read_block(request.slot, i * PREFIX_BLOCK, (i + 1) * PREFIX_BLOCK)
                self.prefix_cache.insert(h, (block[0].clone(), block[1].clone()))

    def _decode(self) -> list[RequestOutput]:
        batch = self.decoding
        ids = torch.tensor([[r.output_ids[-1]] for r in batch], device=self.device)
        positions = torch.tensor([[r.num_computed] for r in batch], device=self.device)
        if self.static_decode:
            logits = self._decode_static(ids, positions)
        else:
            logits = self._forward(slice(0, len(batch)), ids, positions)
        for r in batch:
            r.num_computed += 1
        return self._accept(list(batch), logits)

    def _decode_static(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode step with fixed shapes: the batch is padded to the next power of two and attention spans the
        whole window (the mask hides what is not written), so one CUDA graph per padded size can be replayed.
        Padding rows write their (ignored) key to the window's last entry, which no live sequence still needs:
        a sequence stops before it would attend to that entry."""
        n = ids.shape[0]
        size = min(1 << (n - 1).bit_length(), self.max_batch_size)
        pad_ids = torch.zeros(size, 1, dtype=torch.long, device=self.device)
        pad_positions = torch.full((size, 1), -1, dtype=torch.long, device=self.device)
        pad_ids[:n], pad_positions[:n] = ids, positions
        if not self.cuda_graphs:
            return self._static_forward(pad_ids, pad_positions)[:n]
        if size not in self._graphs:
            self._graphs[size] = self._capture(pad_ids, pad_positions)
        graph, static_ids, static_positions, static_logits = self._graphs[size]
        static_ids.copy_(pad_ids)
        static_positions.copy_(pad_positions)
        graph.replay()
        return static_logits[:n].clone()

    def _static_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decode logits (B, V) for ids/positions (B, 1), where position -1 marks a padding row; tensor ops only."""
        cache, model = self.cache, self.model.model
        last = cache.max_len - 1
        write_index = torch.where(positions >= 0, positions, last)
        cache.bind(slice(0, ids.shape[0]), write_index, positions, cache.max_len)
        hidden, position_embeddings = model.add_positions(model.embed_tokens(ids), positions.clamp(min=0))
        key_positions = cache.positions[: ids.shape[0]]  # (B, max_len)
        allowed = (key_positions >= 0) & (key_positions <= positions)  # (B, max_len); padding rows see nothing...
        allowed[:, last] |= positions[:, 0] < 0  # ...but their own entry, so their softmax stays finite
        if self.sliding_window:
            allowed &= positions - key_positions < self.sliding_window
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        bias = bias.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None, None]  # (B, 1, 1, max_len)
        if self.slopes is not None:
            distance = (positions - key_positions).clamp(min=0).to(self.dtype)[:, None, None]  # (B, 1, 1, max_len)
            bias = (bias - self.slopes.to(self.dtype)[None, :, None, None] * distance).clamp(
                min=torch.finfo(self.dtype).min
            )
        for layer in model.layers:
            hidden, _ = layer(hidden, attention_bias=bias, position_embeddings=position_embeddings, cache=cache)
        return self.model.lm_head(model.norm(hidden)).float()[:, -1]

    def _capture(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple:
        """Record the static decode step for this padded batch size as a CUDA graph (warm up on a side stream first,
        as torch.cuda.graphs requires); replays then reuse its input and output buffers."""
        static_ids, static_positions = ids.clone(), positions.clone()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._static_forward(static_ids, static_positions)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self._static_forward(static_ids, static_positions)
        return graph, static_ids, static_positions, static_logits

    def _accept(self, batch: list[_Request], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample one token per request from logits (B, V), append it, check the stop conditions, stream text."""
        tokens = self._sample(batch, logits)
        outputs, now = [], time.perf_counter()
        for request, token in zip(batch, tokens, strict=True):
            request.output_ids.append(token)
            request.first_token_time = request.first_token_time or now
            self.seen[request.slot, token] = True
            self.stats["generated_tokens"] += 1
            params, reason = request.params, None
            if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
                reason = "stop"
            elif params.max_tokens is not None and len(request.output_ids) >= params.max_tokens:
                reason = "length"
            elif not self.ring and request.num_computed + 1 >= self.max_seq_len:
                reason = "length"  # the next token would not fit the window
            text = self._decode_text(request, final=reason is not None)
            hit = self._find_stop(request, text)
            if hit is not None:
                text, reason = text[:hit], "stop"
            request.text = text
            if reason is not None:
                outputs.append(self._finish(request, reason, last_token=token))
                continue
            # Hold back what could still become the start of a stop string.
            safe = len(text) - max((len(s) - 1 for s in params.stop), default=0)
            delta = text[request.sent : max(safe, request.sent)]
            request.sent += len(delta)
            outputs.append(
                RequestOutput(
                    request.request_id, [token], delta, False, None, len(request.prompt_ids), len(request.output_ids)
                )
            )
        return outputs

    def _decode_text(self, request: _Request, final: bool) -> str:
        """The output text so far. Only the last few tokens are decoded each step (TGI's and vLLM's incremental
        detokenization): the new characters are taken once they no longer end in a half-finished UTF-8 sequence."""
        if self.tokenizer is None:
            return ""
        ids = request.output_ids
        prefix = self.tokenizer.decode(ids[request.prefix_offset : request.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[request.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            request.text += full[len(prefix) :]
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)
        return request.text

    @staticmethod
    def _find_stop(request: _Request, text: str) -> int | None:
        hits = [text.find(s, max(0, request.sent - len(s))) for s in request.params.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _sample(self, batch: list[_Request], logits: torch.Tensor) -> list[int]:
        rows = [r.slot for r in batch]
        penalties = [r.params.repetition_penalty for r in batch]
        if any(p != 1.0 for p in penalties):
            penalty = torch.tensor(penalties, device=self.device)[:, None]
            logits = apply_repetition_penalty(logits, self.seen[rows], penalty)
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(batch) if not r.params.greedy]
        if sampled:
            p = [batch[i].params for i in sampled]
            scaled = logits[sampled] / torch.tensor([x.temperature for x in p], device=self.device)[:, None]
            if any(x.top_k or x.top_p < 1 or x.min_p > 0 for x in p):
                scaled = filter_logits(
                    scaled,
                    top_k=torch.tensor([x.top_k for x in p], device=self.device),
                    top_p=torch.tensor([x.top_p for x in p], device=self.device),
                    min_p=torch.tensor([x.min_p for x in p], device=self.device),
                )
            tokens[sampled] = sample(F.softmax(scaled, dim=-1), [batch[i].generator for i in sampled])
        return tokens.tolist()

    def _finish(self, request: _Request, reason: str, last_token: int | None = None) -> RequestOutput:
        """Free the request's slot (keeping the decoding rows contiguous) and return its last output."""
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.prefilling:
            self.prefilling.remove(request)
            self.slot_owner[request.slot] = None
        elif request in self.decoding:
            index, last = request.slot, self.decoding[-1]
            if last is not request:  # the last row fills the hole
                self.cache.copy_slot(last.slot, index, min(last.num_computed, self.max_seq_len))
                self.seen[index] = self.seen[last.slot]
                self.slot_owner[last.slot] = None
                last.slot, self.slot_owner[index], self.decoding[index] = index, last, last
            else:
                self.slot_owner[index] = None
            self.decoding.pop()
        self.stats["finished"] += 1
        delta = request.text[request.sent :]
        request.sent = len(request.text)
        return RequestOutput(
            request.request_id,
            [] if last_token is None else [last_token],
            delta,
            True,
            reason,
            len(request.prompt_ids),
            len(request.output_ids),
        )

    # -- conveniences -------------------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run prompts to completion together (continuous batching); results in the order of `prompts`."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        pending = list(zip(prompts, params_list, strict=True))
        order: list[str] = []
        results: dict[str, Completion] = {}
        partial: dict[str, tuple[list[int], list[int], list[str]]] = {}  # id -> (prompt ids, token ids, text deltas)
        while pending or self.has_unfinished():
            while pending and len(self.waiting) < self.max_queue:
                prompt, p = pending.pop(0)
                rid = self.add_request(prompt, p)
                order.append(rid)
                partial[rid] = (list(self.requests[rid].prompt_ids), [], [])
            for out in self.step():
                if out.request_id not in partial:
                    continue
                prompt_ids, token_ids, texts = partial[out.request_id]
                token_ids += out.token_ids
                texts.append(out.text)
                if out.finished:
                    results[out.request_id] = Completion(
                        out.request_id, prompt_ids, token_ids, "".join(texts), out.finish_reason
                    )
        return [results[rid] for rid in order]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one request's outputs as they come (other queued requests progress too)."""
        request_id = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            if request_id in self.requests:
                self.abort(request_id)
                self.step()


# ---------------------------------------------------------------------------------------------------------------------
# Sharing one engine between threads and event loops
# ---------------------------------------------------------------------------------------------------------------------
class EngineLoop:
    """Runs `engine.step()` in a background thread, so that many callers (server handlers, UI sessions) share one
    running batch. Only that thread touches the engine's state: callers hand requests and aborts over through an
    inbox (never waiting for a step to end), and outputs come back through each caller's own queue.

        loop = EngineLoop(engine).start()
        for delta in loop.stream("The json module", SamplingParams(max_tokens=20)):   # from any thread
            ...
        async for delta in loop.astream(prompt, params):                              # from asyncio
            ...
        loop.shutdown(timeout=10)   # finish in-flight requests (up to the timeout), abort the rest
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox_lock = threading.Lock()
        self._inbox: list[_Request] = []
        self._aborts: list[str] = []
        self._listeners: dict[str, Callable[[RequestOutput], None]] = {}
        self._work = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._metrics: dict = engine.metrics()
        self.error: BaseException | None = None

    def start(self) -> EngineLoop:
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(
        self, prompt: str | Sequence[int], params: SamplingParams | None, on_output: Callable[[RequestOutput], None]
    ) -> str:
        """Queue a request whose outputs go to `on_output` (called from the engine thread); returns its id.
        Raises ContextWindowError, QueueFullError or ValueError at once, and RuntimeError once shutting down."""
        request = self.engine.make_request(prompt, params)
        with self._inbox_lock:
            if not self.running:
                raise RuntimeError("the engine is not running (shutting down or not started)")
            if len(self._inbox) + len(self.engine.waiting) >= self.engine.max_queue:
                raise QueueFullError(f"the queue is full ({self.engine.max_queue} waiting requests); retry later")
            self._inbox.append(request)
            self._listeners[request.request_id] = on_output
        self._work.set()
        return request.request_id

    def abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._aborts.append(request_id)
        self._work.set()

    def metrics(self) -> dict:
        """The engine's metrics as of its last step."""
        return dict(self._metrics)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Blocking iterator over one request's outputs; leaving it early aborts the request."""
        outputs: queue.Queue[RequestOutput] = queue.Queue()
        request_id = self.submit(prompt, params, outputs.put)
        finished = False
        try:
            while not finished:
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    async def astream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The same for asyncio: cancelling the consumer (a client that went away) aborts the request."""
        event_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = self.submit(prompt, params, lambda out: event_loop.call_soon_threadsafe(outputs.put_nowait, out))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting requests, let running ones finish for up to `timeout` seconds, then abort the rest."""
        with self._inbox_lock:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
        self._work.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout + 5)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._inbox_lock:
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                if self._stopping and time.monotonic() > self._deadline:
                    aborts += list(engine.requests)
            for request in inbox:
                engine.enqueue(request)
            for request_id in aborts:
                engine.abort(request_id)
            if not (engine.has_unfinished() or engine._aborted):
                if self._stopping:
                    return
                self._work.wait(timeout=0.5)
                self._work.clear()
                continue
            try:
                outputs = engine.step()
            except BaseException as error:  # a model error must not leave callers waiting forever
                self.error, self._stopping, self._deadline = error, True, 0.0
                outputs = [engine._finish(r, "abort") for r in list(engine.requests.values())]
            self._metrics = engine.metrics()
            for out in outputs:
                listener = self._listeners.get(out.request_id)
                if out.finished:
                    self._listeners.pop(out.request_id, None)
                if listener is not None:
                    listener(out)
