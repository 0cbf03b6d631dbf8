"""An OpenAI-compatible HTTP server on the tiny_hf engine: the official `openai` client (and anything that speaks its
API) can use a tiny-hf run folder or Hub model.

    tiny-hf serve --model runs/demo --port 8000            # binds 127.0.0.1; the same as python -m app.server
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "demo", "messages": [{"role": "user", "content": "What does json.dumps do?"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="demo", prompt="The json module", max_tokens=20)

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` sends server-sent events),
`GET /v1/models`, `GET /health`, `GET /metrics` (prometheus_client: queue, batch, tokens/s, totals, latency).
With `--rag-index DIR` (an index folder of `tiny-hf index`) also `POST /v1/rag/answer`, grounded answers
(rag/answer.py) generated greedily on the same loop:

    curl localhost:8000/v1/rag/answer -H 'Content-Type: application/json' \\
        -d '{"question": "How do I parse JSON?", "k": 4, "mode": "hybrid", "max_tokens": 64}'
    # {"answer": "... [1] ...", "citations": [source, ...], "sources": [source, ...], "dropped": 0, "usage": {...}}

A source is {"number", "doc_id", "start", "end", "chunk_index", "score", "text"}: `sources` are the retrieved
passages the prompt held, numbered as in the prompt, and `citations` those the answer names as [n].

Every error is a 4xx/5xx with OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: malformed JSON or
parameters 400, a wrong API key 401, an unknown model 404, a prompt over the context window 400
(`context_length_exceeded`), a full queue 429. All requests share one continuous batch (tiny_hf.engine.EngineLoop);
a client that disconnects mid-stream frees its slot; on shutdown (Ctrl-C, SIGTERM) in-flight requests get
`--shutdown-timeout` seconds to finish and are then cancelled.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rag.answer import QuestionTooLongError, cite, grounded_prompt
from rag.index import RagIndex, load_rag_index
from tiny_hf.chat import end_of_turn_ids
from tiny_hf.engine import (
    WINDOW_POLICIES,
    ContextWindowError,
    Engine,
    EngineLoop,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    fit_messages,
)
from tiny_hf.options import parse_options

from .launch import LOAD_ERRORS, ListenOptions, ModelOptions, RetrievalOptions, cannot_load, load_engine


# ---------------------------------------------------------------------------------------------------------------------
# Request bodies: the OpenAI fields we support, with their ranges, plus top_k/min_p/repetition_penalty (pass them with
# the client's `extra_body`). Unknown fields are ignored, as OpenAI does.
# ---------------------------------------------------------------------------------------------------------------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # as vLLM: generate exactly max_tokens (benchmarks)
    n: int = Field(default=1, ge=1)  # one choice per prompt: `check_n` refuses more
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int | None, stop_token_ids: Sequence[int] = ()) -> SamplingParams:
        """The engine's parameters for this request. Raises ApiError (400) for a combination the engine refuses."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                stop=stop,
                stop_token_ids=tuple(stop_token_ids),
                ignore_eos=self.ignore_eos,
                seed=self.seed,
            )
        except ValueError as error:
            raise ApiError(400, str(error)) from error

    @field_validator("n")
    @classmethod
    def check_n(cls, n: int) -> int:
        if n > 1:
            raise ValueError(f"n={n} is not supported: this server returns one choice per request; send {n} requests")
        return n

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    def prompts(self, start: list[int]) -> list[str | list[int]]:
        """The prompts, one per choice: a text or a list of token ids; an empty one (as in OpenAI's API) starts
        from `start`, the start-of-text token. Raises ApiError for no prompt at all."""
        prompts = self.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ApiError(400, "prompt must not be an empty list", param="prompt")
        return [p if len(p) else start for p in prompts]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text") for p in self.content if p.get("type") == "text"]
        if len(parts) != len(self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class RagRequest(BaseModel):
    """A grounded question: retrieve `k` passages by `mode`, answer greedily in at most `max_tokens` tokens."""

    model_config = ConfigDict(extra="ignore")

    question: str
    k: int = Field(default=4, ge=1)
    mode: Literal["bm25", "dense", "hybrid"] = "hybrid"
    max_tokens: int | None = Field(default=None, ge=1)


# ---------------------------------------------------------------------------------------------------------------------
# Errors: OpenAI's body for every one of them
# ---------------------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _engine_error(error: Exception) -> ApiError:
    if isinstance(error, ContextWindowError):
        return ApiError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, QueueFullError):
        return ApiError(429, str(error), code="queue_full")
    if isinstance(error, RuntimeError):
        return ApiError(503, str(error), code="shutting_down")
    return ApiError(400, str(error))


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path 404, a method the route lacks 405) with OpenAI's body."""
    body = ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").body()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors as OpenAI's 400: the first problem, naming its field and the value it got."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return JSONResponse(ApiError(400, "the request body is not valid JSON").body(), status_code=400)
    where = [str(x) for x in first.get("loc", ()) if x != "body"]
    message = f"{'.'.join(where) or 'body'}: {first.get('msg', '').removeprefix('Value error, ')}"
    if "input" in first and where:
        message += f" (got {json.dumps(first['input'], default=str)[:100]})"
    return JSONResponse(ApiError(400, message, param=where[0] if where else None).body(), status_code=400)


# ---------------------------------------------------------------------------------------------------------------------
# Telemetry: GET /metrics in Prometheus' text format
# ---------------------------------------------------------------------------------------------------------------------
GAUGES = ("queue_length", "running", "tokens_per_second", "prefix_cache_hit_rate")  # the rest of loop.metrics() count
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds


class EngineCollector:
    """The engine loop's figures at scrape time: gauges for the queue and the batch, counters for the totals."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def collect(self):
        for key, value in self.loop.metrics().items():
            family = GaugeMetricFamily if key in GAUGES else CounterMetricFamily
            yield family(f"tiny_hf_{key}", key.replace("_", " "), value=float(value))


class Telemetry:
    """One registry per app (so that several apps in a process do not collide): the engine's figures, and time to
    first token and request latency as histograms, observed on every request the engine runs."""

    def __init__(self, loop: EngineLoop):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(loop))
        self.ttft = Histogram(
            "tiny_hf_time_to_first_token_seconds",
            "from the request to its first output",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "tiny_hf_request_latency_seconds",
            "from the request to its last output",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    async def timed(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """`stream` unchanged, observing its time to the first and to the last output; closing it closes `stream`."""
        start, first = time.perf_counter(), True
        try:
            async for out in stream:
                if first:
                    self.ttft.observe(time.perf_counter() - start)
                    first = False
                if out.finished:
                    self.latency.observe(time.perf_counter() - start)
                yield out
        finally:
            await stream.aclose()


# ---------------------------------------------------------------------------------------------------------------------
# The state every route reads: app.state.server
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ServerState:
    """The engine loop the routes share and how the server presents it (`build_app` puts it in `app.state.server`).

    Args:
        loop: The running EngineLoop; its engine's tokenizer is the chat template's.
        model_name: The one model name requests may ask for.
        api_key: When set, every /v1 route wants `Authorization: Bearer <api_key>`.
        shutdown_timeout: Seconds in-flight requests get once the server stops.
        rag_index: Serve grounded answers from it at `POST /v1/rag/answer`.
    """

    loop: EngineLoop
    model_name: str
    api_key: str | None = None
    shutdown_timeout: float = 10.0
    rag_index: RagIndex | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    telemetry: Telemetry = field(init=False)

    def __post_init__(self):
        self.telemetry = Telemetry(self.loop)

    @property
    def engine(self) -> Engine:
        return self.loop.engine

    def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One request's outputs from the engine loop, timed for /metrics."""
        return self.telemetry.timed(self.loop.astream(prompt, params))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            message = f"the model {name!r} does not exist; this server has {self.model_name!r}"
            raise ApiError(404, message, param="model", code="model_not_found")

    def reply_room(self, max_tokens: int | None) -> int:
        """The tokens kept for a reply: `max_tokens`, or by default a quarter of the window (at most 256)."""
        return max_tokens or min(256, self.engine.max_seq_len // 4)

    def start_of_text(self) -> list[int]:
        """What an empty completion prompt starts from: the tokenizer's bos token, else its eos (GPT-2's way)."""
        tokenizer = self.engine.tokenizer
        return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]

    def end_of_turn(self, ignore_eos: bool = False) -> list[int]:
        """The ids a chat reply stops at: the end of the turn, and eos unless the request ignores it."""
        eos = self.engine.tokenizer.eos_token_id
        return [t for t in end_of_turn_ids(self.engine.tokenizer) if not (ignore_eos and t == eos)]


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


def authorize(state: State, request: Request) -> None:
    sent = request.headers.get("authorization", "").encode()
    if state.api_key is not None and not secrets.compare_digest(sent, f"Bearer {state.api_key}".encode()):
        raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


# ---------------------------------------------------------------------------------------------------------------------
# Running requests on the loop: to completion, or as server-sent events
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Reply:
    """The fields every response body and stream chunk of one request repeats."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


async def _run(state: ServerState, prompts: Sequence, params: SamplingParams) -> list[RequestOutput]:
    """Run prompts to completion: each one's last output, its text the whole reply."""
    results = []
    for prompt in prompts:
        text, last = [], None
        try:
            async for out in state.stream(prompt, params):
                text.append(out.text)
                last = out
        except (ValueError, RuntimeError) as error:
            raise _engine_error(error) from error
        results.append(dataclasses.replace(last, text="".join(text)))
    return results


def _usage(results: Sequence[RequestOutput]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_response(
    state: ServerState,
    prompt: str | list[int],
    params: SamplingParams,
    reply: _Reply,
    choices: Callable[[RequestOutput], list[dict]],
    *,
    opening: Sequence[dict] = (),
    include_usage: bool = False,
) -> StreamingResponse:
    """One request as server-sent events: a chunk for each choice in `opening`, then for each one `choices` makes of
    each output, a usage chunk when asked, then `[DONE]`.

    The first output is awaited before the response starts, so that errors (window, full queue) become a status code
    and not a broken event stream. A client that goes away cancels the response, which closes the engine stream: that
    aborts the request and frees its slot.
    """
    stream = state.stream(prompt, params)
    try:
        first = await anext(stream)
    except (ValueError, RuntimeError) as error:
        raise _engine_error(error) from error

    async def events(out: RequestOutput) -> AsyncIterator[str]:
        try:
            for choice in opening:
                yield _sse(reply.body([choice]))
            while True:
                for choice in choices(out):
                    yield _sse(reply.body([choice]))
                if out.finished:
                    break
                out = await anext(stream)
            if include_usage:
                yield _sse(reply.body([], usage=_usage([out])))
            yield _sse("[DONE]")
        finally:
            await stream.aclose()

    return StreamingResponse(events(first), media_type="text/event-stream")


# ---------------------------------------------------------------------------------------------------------------------
# Routes: `public` is open to all (load balancers, Prometheus), `api` and `rag` want the API key when there is one
# ---------------------------------------------------------------------------------------------------------------------
public = APIRouter()
api = APIRouter(dependencies=[Depends(authorize)])
rag = APIRouter(dependencies=[Depends(authorize)])


@public.get("/health")
async def health(state: State) -> dict:
    return {"status": "ok", "model": state.model_name}


@public.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.telemetry.registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models")
async def models(state: State) -> dict:
    entry = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "tiny-hf",
        "max_model_len": state.engine.max_seq_len,
    }
    return {"object": "list", "data": [entry]}


def _text_choice(index: int, out: RequestOutput) -> dict:
    return {"index": index, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}


def _completion_chunks(out: RequestOutput) -> list[dict]:
    return [_text_choice(0, out)]  # every output is a chunk, even one without text (the last, with its reason)


@api.post("/v1/completions")
async def completions(body: CompletionRequest, state: State):
    state.check_model(body.model)
    prompts = body.prompts(start=state.start_of_text())
    params = body.sampling_params(body.max_tokens)
    reply = _Reply(f"cmpl-{uuid.uuid4().hex}", "text_completion", state.model_name)
    if body.stream:
        if len(prompts) != 1:
            raise ApiError(400, "stream with one prompt at a time", param="prompt")
        return await stream_response(
            state, prompts[0], params, reply, _completion_chunks, include_usage=body.include_usage
        )
    results = await _run(state, prompts, params)
    return reply.body([_text_choice(i, r) for i, r in enumerate(results)], usage=_usage(results))


def _delta(delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def _chat_chunks(out: RequestOutput) -> list[dict]:
    """The chat chunks of one output: its text, if any, then the finish reason once it has one."""
    return ([_delta({"content": out.text})] if out.text else []) + (
        [_delta({}, out.finish_reason)] if out.finished else []
    )


def _chat_prompt(state: ServerState, body: ChatRequest, max_tokens: int | None) -> list[int]:
    """The messages through the chat template, fitted into the window less the reply's room (the engine's window
    policy says whether old turns are dropped or the request refused)."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    budget = state.engine.max_seq_len - state.reply_room(max_tokens)
    try:
        prompt_ids, _ = fit_messages(
            state.engine.tokenizer, messages, budget=max(budget, 1), policy=state.engine.window_policy
        )
    except ValueError as error:
        raise _engine_error(error) from error
    return prompt_ids


@api.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, state: State):
    state.check_model(body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens
    prompt_ids = _chat_prompt(state, body, max_tokens)
    params = body.sampling_params(max_tokens, stop_token_ids=state.end_of_turn(body.ignore_eos))
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        reply = _Reply(rid, "chat.completion.chunk", state.model_name)
        opening = [_delta({"role": "assistant", "content": ""})]
        return await stream_response(
            state, prompt_ids, params, reply, _chat_chunks, opening=opening, include_usage=body.include_usage
        )
    (result,) = await _run(state, [prompt_ids], params)
    message = {"role": "assistant", "content": result.text}
    choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
    return _Reply(rid, "chat.completion", state.model_name).body([choice], usage=_usage([result]))


@rag.post("/v1/rag/answer")
async def rag_answer(body: RagRequest, state: State) -> dict:
    max_tokens = state.reply_room(body.max_tokens)
    try:
        # Retrieval (a dense query runs the encoder) and tokenizing are CPU work: off the event loop.
        prompt_ids, sources, dropped = await run_in_threadpool(
            grounded_prompt,
            body.question,
            state.rag_index,
            state.engine.tokenizer,
            window=state.engine.max_seq_len,
            k=body.k,
            mode=body.mode,
            max_new_tokens=max_tokens,
        )
    except QuestionTooLongError as error:
        raise ApiError(400, str(error), param="question", code="context_length_exceeded") from error
    except ValueError as error:  # an empty question, or max_tokens leaving no room for a prompt
        raise ApiError(400, str(error)) from error
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=state.end_of_turn())
    (result,) = await _run(state, [prompt_ids], params)
    grounded = cite(result.text.strip(), sources, prompt_tokens=len(prompt_ids), dropped=dropped)
    return {
        "answer": grounded.text,
        "citations": [c.to_dict() for c in grounded.citations],
        "sources": [s.to_dict() for s in grounded.sources],
        "dropped": grounded.dropped,
        "usage": _usage([result]),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------
@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    state: ServerState = app.state.server
    state.loop.shutdown(timeout=state.shutdown_timeout)  # uvicorn has stopped accepting: finish or cancel the rest


def build_app(
    loop: EngineLoop,
    *,
    model_name: str,
    api_key: str | None = None,
    shutdown_timeout: float = 10.0,
    rag_index: RagIndex | None = None,
) -> FastAPI:
    """The FastAPI app serving `loop`'s engine under the name `model_name`; with `rag_index` also
    `POST /v1/rag/answer`. See `ServerState` for the arguments."""
    app = FastAPI(title="tiny-hf", lifespan=_lifespan)
    app.state.server = ServerState(
        loop, model_name, api_key=api_key, shutdown_timeout=shutdown_timeout, rag_index=rag_index
    )
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(public)
    app.include_router(api)
    if rag_index is not None:
        app.include_router(rag)
    return app


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EngineOptions:
    _argument_group_name = "engine"

    max_batch_size: int = field(default=16, metadata={"help": "requests decoded together (the cache slots)"})
    max_queue: int = field(default=256, metadata={"help": "waiting requests at most; more are answered 429"})
    token_budget: int = field(default=512, metadata={"help": "prompt tokens computed per step"})
    window_policy: str = field(
        default="reject", metadata={"help": "a prompt over the window: refused or cut", "choices": WINDOW_POLICIES}
    )
    compile: bool = field(default=False, metadata={"help": "compile the decode step (fast batch-1 on CPU)"})
    decode_steps: int = field(
        default=1, metadata={"help": "greedy tokens per decode call when every running request is greedy"}
    )


@dataclass
class ServeOptions:
    _argument_group_name = "API"

    served_model_name: str | None = field(
        default=None, metadata={"help": "the name clients use (default: the folder name)"}
    )
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer <key>'"})
    shutdown_timeout: float = field(default=10.0, metadata={"help": "seconds in-flight requests get on exit"})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    model, engine_options, listen, retrieval, serve = parse_options(
        ModelOptions, EngineOptions, ListenOptions, RetrievalOptions, ServeOptions, argv=argv, description=__doc__
    )
    rag_index = load_rag_index(retrieval.rag_index) if retrieval.rag_index else None  # before the model: fail fast
    try:
        engine, _ = load_engine(
            model.model,
            device=model.device,
            trust_remote_code=model.trust_remote_code,
            max_seq_len=model.max_seq_len,
            **dataclasses.asdict(engine_options),
        )
    except LOAD_ERRORS as error:
        raise cannot_load(model.model, error) from None
    name = serve.served_model_name or Path(model.model.rstrip("/")).name
    app = build_app(
        EngineLoop(engine).start(),
        model_name=name,
        api_key=serve.api_key,
        shutdown_timeout=serve.shutdown_timeout,
        rag_index=rag_index,
    )
    print(f"Serving {model.model} as {name!r} on http://{listen.host}:{listen.port}/v1 ({engine.max_seq_len} tokens)")
    if rag_index is not None:
        print(f"Grounded answers from {retrieval.rag_index} ({len(rag_index)} chunks) at POST /v1/rag/answer")
    uvicorn.run(
        app,
        host=listen.host,
        port=listen.port,
        log_level="info",
        timeout_graceful_shutdown=int(serve.shutdown_timeout) + 1,
    )


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
