"""The engine: requests in, tokens and text out, one scheduling step at a time.

Each `step()` drops aborted requests, decodes one token for every running sequence in one batched forward, admits
waiting requests into free slots and spends the rest of the token budget on prompt chunks (scheduler.py), then
samples, checks stop conditions and streams text (sampling.py, detokenize.py). `generate()` and `stream()` drive
steps for one caller; `EngineLoop` (loop.py) drives them in a thread shared by many.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from .config import EngineConfig, supports
from .detokenize import decode_new_text, find_stop, safe_delta
from .kv_cache import SlotKVCache
from .model_runner import ModelRunner
from .sampling import SamplingParams, sample_tokens
from .scheduler import Scheduler
from .sequence import Completion, Request, RequestOutput


class Engine:
    """Continuous-batching inference for a `TinyForCausalLM`, or a Llama-family model (run through
    `tiny_hf.from_llama`, which shares its weights).

    Args:
        model: The causal LM, on its device.
        tokenizer: Its tokenizer (for prompts given as text, stop strings and streamed text).
        max_batch_size: Sequences decoded together (cache slots).
        max_seq_len: Context window per sequence (prompt + output); defaults to `max_position_embeddings`.
        token_budget: Most prompt tokens computed per step (chunked prefill), so long prompts do not stall decoding.
        max_queue: Requests that may wait for a slot; one more raises `QueueFullError`.
        prefix_cache_tokens: Prompt tokens whose KV is kept for reuse (0 turns prefix caching off).
        window_policy: What to do with a prompt that does not fit: one of WINDOW_POLICIES.
        cuda_graphs: Replay each decode step as a CUDA graph (default: on when the model is on a GPU).
        static_decode: Decode with the fixed shapes CUDA graphs need, without capturing them (testable on a CPU).
            Not used with the sliding ring or dynamic NTK RoPE.
        compile: Compile the static decode step with torch.compile (inductor; on CPU with its C++ wrapper): what
            makes batch-1 decoding fast on a CPU. Costs a compilation per padded batch size on first use.
        decode_steps: Greedy decode steps per engine step when every running request is greedy without stop strings
            or repetition penalty (multi-step scheduling): the engine's Python runs once per `decode_steps` tokens.
    """

    supports = staticmethod(supports)

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
        decode_steps: int = 1,
    ):
        from ..convert import engine_ready  # convert -> chat -> engine: imported here, not at the top

        model = engine_ready(model).eval()
        self.settings = EngineConfig(
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            token_budget=token_budget,
            max_queue=max_queue,
            prefix_cache_tokens=prefix_cache_tokens,
            window_policy=window_policy,
            cuda_graphs=cuda_graphs,
            static_decode=static_decode,
            compile=compile,
            decode_steps=decode_steps,
        ).resolve(model)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.max_batch_size, self.max_seq_len = self.settings.max_batch_size, self.settings.max_seq_len
        self.max_queue, self.window_policy = max_queue, window_policy
        self.ring = window_policy == "sliding"
        self.cache = self._make_cache()
        # A prefill chunk must not overwrite ring entries its own first query still needs.
        chunk_limit = min(token_budget, self.max_seq_len - self.config.sliding_window) if self.ring else token_budget
        self.scheduler = Scheduler(
            self.cache,
            max_queue=max_queue,
            token_budget=token_budget,
            prefix_cache_tokens=prefix_cache_tokens,
            window_policy=window_policy,
            chunk_limit=chunk_limit,
        )
        s = self.settings
        self.runner = ModelRunner(
            model,
            self.cache,
            cuda_graphs=s.cuda_graphs,
            static_decode=s.static_decode,
            compile=compile,
            decode_steps=decode_steps,
        )
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {eos if eos is not None else self.config.eos_token_id} - {None}
        self.requests: dict[str, Request] = {}
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self.stats = dict.fromkeys(
            ["requests", "finished", "prompt_tokens", "cached_prompt_tokens", "generated_tokens", "steps"], 0
        )
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) per step, for tokens/s

    def _make_cache(self) -> SlotKVCache:
        config = self.config
        return SlotKVCache(
            num_layers=config.num_hidden_layers,
            num_slots=self.max_batch_size,
            num_kv_heads=config.num_key_value_heads,
            max_len=self.max_seq_len,
            head_dim=config.head_dim,
            vocab_size=config.vocab_size,
            dtype=self.dtype,
            device=self.device,
        )

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
        """Load a run folder or Hub id through the Auto classes (fp32 on CPU, bf16 on a GPU)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model.to(device), tokenizer, **kwargs)

    # -- the state, as the scheduler holds it -------------------------------------------------------------------------
    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def slot_owner(self):
        return self.scheduler.slot_owner

    @property
    def static_decode(self) -> bool:
        return self.runner.static_decode

    @property
    def cuda_graphs(self) -> bool:
        return self.runner.cuda_graphs

    # -- requests -----------------------------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request (text, or token ids); returns its id. Raises ContextWindowError or QueueFullError."""
        return self.enqueue(self.make_request(prompt, params, request_id))

    def make_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
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
        ids = self.scheduler.fit(ids, params.max_tokens)
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return Request(request_id, ids, params, time.perf_counter(), generator)

    def enqueue(self, request: Request) -> str:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        self.scheduler.enqueue(request)
        self.requests[request.request_id] = request
        self.stats["requests"] += 1
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request (a client went away); its slot is freed at the next step."""
        if request_id in self.requests:
            self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def metrics(self) -> dict:
        """Queue length, running requests, recent tokens/s, prefix-cache hit rate and totals."""
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > 10:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        tokens = sum(n for _, n in list(self._recent)[1:])
        cache, s = self.scheduler.prefix_cache, self.scheduler
        return {
            "queue_length": len(s.waiting),
            "running": len(s.prefilling) + len(s.decoding),
            "tokens_per_second": tokens / span if span > 0 else 0.0,
            "prefix_cache_hit_rate": cache.hits / cache.queries if cache and cache.queries else 0.0,
            **self.stats,
        }

    # -- the step -----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling step: drop aborted requests, decode one token for every running sequence, admit waiting
        ones into free slots and spend the rest of the token budget on prompt chunks. Returns the step's outputs."""
        outputs: list[RequestOutput] = []
        for request_id in list(self._aborted):
            request = self.requests.get(request_id)
            if request is not None:
                outputs.append(self._finish(request, "abort"))
        self._aborted.clear()
        if self.scheduler.decoding:
            outputs += self._decode()
        for request in self.scheduler.admit():
            self.stats["prompt_tokens"] += len(request.prompt_ids)
            self.stats["cached_prompt_tokens"] += request.num_computed
        groups = self.scheduler.plan_prefill()
        if groups:
            outputs += self._prefill(groups)
        self.stats["steps"] += 1
        self._recent.append((time.perf_counter(), sum(len(o.token_ids) for o in outputs)))
        return outputs

    def _prefill(self, groups: list[list[tuple[Request, int]]]) -> list[RequestOutput]:
        """Compute the planned prompt chunks, many prompts per forward (right-padded: one forward of B x longest
        chunk instead of B forwards, whose fixed per-call cost dominates for short prompts), then move the requests
        whose prompt is complete into the decoding rows and sample their first tokens."""
        last_logits = {}  # request id -> logits (V,) of its prompt's last token
        for group in groups:
            width = max(chunk for _, chunk in group)
            ids, positions = [], []
            for request, chunk in group:
                start, pad = request.num_computed, width - chunk
                ids.append(request.prompt_ids[start : start + chunk] + [0] * pad)
                positions.append(list(range(start, start + chunk)) + [-1] * pad)
            logits = self.runner.forward(
                torch.tensor([request.slot for request, _ in group], device=self.device),
                torch.tensor(ids, device=self.device),
                torch.tensor(positions, device=self.device),
                last_index=torch.tensor([chunk - 1 for _, chunk in group], device=self.device),
            )
            for row, (request, chunk) in enumerate(group):
                request.num_computed += chunk
                if request.num_computed == len(request.prompt_ids):
                    last_logits[request.request_id] = logits[row]
        done = [r for r in self.scheduler.prefilling if r.request_id in last_logits]  # in arrival order
        for request in done:
            self.scheduler.start_decoding(request)
        if not done:
            return []
        return self._accept(done, torch.stack([last_logits[r.request_id] for r in done]))

    def _decode(self) -> list[RequestOutput]:
        batch = list(self.scheduler.decoding)
        ids = torch.tensor([[r.output_ids[-1]] for r in batch], device=self.device)
        positions = torch.tensor([[r.num_computed] for r in batch], device=self.device)
        if self._multi_step(batch):
            return self._append(batch, self.runner.decode_greedy(ids, positions).tolist(), advance=True)
        return self._append(
            batch, [[t] for t in self._sample(batch, self.runner.decode(ids, positions))], advance=True
        )

    def _multi_step(self, batch: list[Request]) -> bool:
        """Whether this decode step can run `decode_steps` greedy steps at once: every request greedy, with no
        repetition penalty or stop strings (their tokens are checked one by one), and room in the window."""
        steps = self.runner.decode_steps
        return (
            steps > 1
            and not self.ring
            and all(
                r.params.greedy
                and r.params.repetition_penalty == 1.0
                and not r.params.stop
                and r.num_computed + steps < self.max_seq_len
                for r in batch
            )
        )

    def _accept(self, batch: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample one token per request from the logits (B, V) of its prompt's last token, and append it."""
        return self._append(batch, [[t] for t in self._sample(batch, logits)], advance=False)

    def _append(self, batch: list[Request], new_tokens: list[list[int]], advance: bool) -> list[RequestOutput]:
        """Append each request's new tokens in order up to the first stop condition (`advance`: each was fed by a
        decode step, so its predecessor's keys are now cached), then stream the new text. Finished requests leave
        last: freeing a slot moves another row's cache, which must hold all of its new entries by then."""
        outputs, finished, now = [], [], time.perf_counter()
        for request, tokens in zip(batch, new_tokens, strict=True):
            reason, taken = None, 0
            for token in tokens:
                taken += 1
                request.num_computed += advance
                request.output_ids.append(token)
                self.cache.seen[request.slot, token] = True
                self.stats["generated_tokens"] += 1
                reason = self._stop_reason(request, token)
                if reason is not None:
                    break
            request.first_token_time = request.first_token_time or now
            text = decode_new_text(self.tokenizer, request, final=reason is not None)
            hit = find_stop(request, text)
            if hit is not None:
                text, reason = text[:hit], "stop"
            request.text = text
            if reason is not None:
                finished.append((request, reason, tokens[:taken]))
                continue
            outputs.append(
                RequestOutput(
                    request.request_id,
                    tokens,
                    safe_delta(request, text),
                    False,
                    None,
                    len(request.prompt_ids),
                    len(request.output_ids),
                )
            )
        return outputs + [self._finish(r, reason, new_tokens=tokens) for r, reason, tokens in finished]

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[int]:
        seen = self.cache.seen[[r.slot for r in batch]]
        return sample_tokens(logits, [r.params for r in batch], [r.generator for r in batch], seen)

    def _stop_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            return "stop"
        if params.max_tokens is not None and len(request.output_ids) >= params.max_tokens:
            return "length"
        if not self.ring and request.num_computed + 1 >= self.max_seq_len:
            return "length"  # the next token would not fit the window
        return None

    def _finish(self, request: Request, reason: str, new_tokens: list[int] | None = None) -> RequestOutput:
        """Free the request's slot and return its last output (with this step's `new_tokens`)."""
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
        self.scheduler.remove(request)
        self.stats["finished"] += 1
        delta = request.text[request.sent :]
        request.sent = len(request.text)
        return RequestOutput(
            request.request_id,
            list(new_tokens or []),
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
