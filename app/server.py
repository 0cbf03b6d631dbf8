"""An OpenAI-compatible HTTP server on the tiny_hf engine: the official `openai` client (and anything that speaks its
API) can use a tiny-hf run folder or Hub model.

    python -m app.server --model runs/demo --port 8000            # binds 127.0.0.1
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "demo", "messages": [{"role": "user", "content": "What does json.dumps do?"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="demo", prompt="The json module", max_tokens=20)

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` sends server-sent events),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text: queue length, running requests, tokens/s, totals).
With `--rag-index DIR` (an index folder of `python -m rag.index`) also `POST /v1/rag/answer`, grounded answers
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

import argparse
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import tiny_hf  # noqa: F401 (registers the tiny model type with the Auto classes)
from rag.answer import QuestionTooLongError, cite, grounded_prompt
from rag.index import load_rag_index
from tiny_hf.engine import (
    WINDOW_POLICIES,
    ContextWindowError,
    Engine,
    EngineLoop,
    QueueFullError,
    SamplingParams,
    fit_messages,
)
from tiny_hf.runs import resolve_model


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
    n: int = Field(default=1, ge=1, le=1)  # one choice per prompt
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int | None, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=self.ignore_eos,
            seed=self.seed,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


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
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _engine_error(error: Exception) -> ApiError:
    if isinstance(error, ContextWindowError):
        return ApiError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, QueueFullError):
        return ApiError(429, str(error), code="queue_full")
    if isinstance(error, RuntimeError):
        return ApiError(503, str(error), code="shutting_down")
    return ApiError(400, str(error))


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------
def build_app(
    loop: EngineLoop, *, model_name: str, api_key: str | None = None, shutdown_timeout: float = 10.0, rag_index=None
) -> FastAPI:
    """The FastAPI app serving `loop`'s engine under the name `model_name`; with `rag_index` (a
    `rag.index.RagIndex`) also `POST /v1/rag/answer`."""
    engine = loop.engine
    tokenizer = engine.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        loop.shutdown(timeout=shutdown_timeout)  # uvicorn has stopped accepting; finish or cancel in-flight requests

    app = FastAPI(title="tiny-hf", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(ApiError(400, "the request body is not valid JSON").body(), status_code=400)
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg')}"
        if "input" in first and where:
            message += f" (got {json.dumps(first['input'], default=str)[:100]})"
        return JSONResponse(ApiError(400, message, param=where[0] if where else None).body(), status_code=400)

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server has {model_name!r}",
                param="model",
                code="model_not_found",
            )

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        lines = []
        for key, value in loop.metrics().items():
            lines += [f"# TYPE tiny_hf_{key} gauge", f"tiny_hf_{key} {float(value):.6g}"]
        return "\n".join(lines) + "\n"

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        entry = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "tiny-hf",
            "max_model_len": engine.max_seq_len,
        }
        return {"object": "list", "data": [entry]}

    def reply_room(max_tokens: int | None) -> int:
        """The tokens kept for a reply: `max_tokens`, or by default a quarter of the window (at most 256)."""
        return max_tokens or min(256, engine.max_seq_len // 4)

    def stop_at_end_of_turn() -> tuple[int, ...]:
        return (end_of_turn,) if end_of_turn is not None else ()

    async def run(prompts: list, params: SamplingParams, request: Request) -> list[dict]:
        """Run prompts to completion; each result has text, finish_reason and token counts."""
        results = []
        for prompt in prompts:
            text, last = [], None
            try:
                async for out in loop.astream(prompt, params):
                    text.append(out.text)
                    last = out
            except (ValueError, RuntimeError) as error:
                raise _engine_error(error) from error
            counts = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens}
            results.append({"text": "".join(text), "finish_reason": last.finish_reason, **counts})
        return results

    def usage(results: list[dict]) -> dict:
        prompt = sum(r["prompt_tokens"] for r in results)
        completion = sum(r["completion_tokens"] for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def first_output(stream):
        """Start a stream and fetch its first output, so that errors (window, queue) become a status code and not a
        broken event stream."""
        try:
            return await anext(stream)
        except (ValueError, RuntimeError) as error:
            raise _engine_error(error) from error

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        params = _params(body, body.max_tokens)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            results = await run(prompts, params, request)
            choices = [
                {"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                for i, r in enumerate(results)
            ]
            return {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": model_name,
                "choices": choices,
                "usage": usage(results),
            }
        if len(prompts) != 1:
            raise ApiError(400, "stream with one prompt at a time", param="prompt")
        stream = loop.astream(prompts[0], params)
        first = await first_output(stream)

        async def events():
            out = first
            while True:
                chunk = {
                    "id": rid,
                    "object": "text_completion",
                    "created": now,
                    "model": model_name,
                    "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}],
                }
                yield sse(chunk)
                if out.finished:
                    break
                out = await anext(stream)
            if (body.stream_options or {}).get("include_usage"):
                yield sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": now,
                        "model": model_name,
                        "choices": [],
                        "usage": usage(
                            [{"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}]
                        ),
                    }
                )
            yield sse("[DONE]")

        return StreamingResponse(_closing(events(), stream), media_type="text/event-stream")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
        ]
        max_tokens = body.max_completion_tokens or body.max_tokens
        budget = engine.max_seq_len - reply_room(max_tokens)
        try:
            prompt_ids, _dropped = fit_messages(
                tokenizer, messages, budget=max(budget, 1), policy=engine.window_policy
            )
        except ValueError as error:
            raise _engine_error(error) from error
        params = _params(body, max_tokens, stop_token_ids=stop_at_end_of_turn())
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            (result,) = await run([prompt_ids], params, request)
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
            return {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": model_name,
                "choices": [choice],
                "usage": usage([result]),
            }
        stream = loop.astream(prompt_ids, params)
        first = await first_output(stream)

        async def events():
            def chunk(delta: dict, finish_reason: str | None) -> str:
                return sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": now,
                        "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                    }
                )

            yield chunk({"role": "assistant", "content": ""}, None)
            out = first
            while True:
                if out.text:
                    yield chunk({"content": out.text}, None)
                if out.finished:
                    yield chunk({}, out.finish_reason)
                    break
                out = await anext(stream)
            if (body.stream_options or {}).get("include_usage"):
                yield sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": now,
                        "model": model_name,
                        "choices": [],
                        "usage": usage(
                            [{"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}]
                        ),
                    }
                )
            yield sse("[DONE]")

        return StreamingResponse(_closing(events(), stream), media_type="text/event-stream")

    if rag_index is not None:

        @app.post("/v1/rag/answer", dependencies=auth)
        async def rag_answer(body: RagRequest, request: Request) -> dict:
            max_tokens = reply_room(body.max_tokens)
            try:
                # Retrieval (a dense query runs the encoder) and tokenizing are CPU work: off the event loop.
                prompt_ids, sources, dropped = await run_in_threadpool(
                    grounded_prompt,
                    body.question,
                    rag_index,
                    tokenizer,
                    window=engine.max_seq_len,
                    k=body.k,
                    mode=body.mode,
                    max_new_tokens=max_tokens,
                )
            except QuestionTooLongError as error:
                raise ApiError(400, str(error), param="question", code="context_length_exceeded") from error
            except ValueError as error:  # an empty question, or max_tokens leaving no room for a prompt
                raise ApiError(400, str(error)) from error
            params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stop_at_end_of_turn())
            (result,) = await run([prompt_ids], params, request)
            grounded = cite(result["text"].strip(), sources, prompt_tokens=len(prompt_ids), dropped=dropped)
            return {
                "answer": grounded.text,
                "citations": [c.to_dict() for c in grounded.citations],
                "sources": [s.to_dict() for s in grounded.sources],
                "dropped": grounded.dropped,
                "usage": usage([result]),
            }

    return app


def _params(body: _Sampling, max_tokens: int | None, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, stop_token_ids)
    except ValueError as error:
        raise ApiError(400, str(error)) from error


async def _closing(events, stream):
    """Forward the events; when the client goes away (the response is cancelled), close the engine stream, which
    aborts the request and frees its slot."""
    try:
        async for event in events:
            yield event
    finally:
        await stream.aclose()


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="runs/demo", help="a run folder (its model/), a model folder or a Hub id")
    model.add_argument("--served-model-name", default=None, help="the name clients use (default: the folder name)")
    model.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    model.add_argument("--trust-remote-code", action="store_true")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-batch-size", type=int, default=16)
    engine.add_argument("--max-seq-len", type=int, default=None, help="context window (default: the model's)")
    engine.add_argument("--max-queue", type=int, default=256)
    engine.add_argument("--token-budget", type=int, default=512, help="prompt tokens computed per step")
    engine.add_argument("--window-policy", default="reject", choices=WINDOW_POLICIES)
    engine.add_argument("--compile", action="store_true", help="compile the decode step (fast batch-1 on CPU)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>'")
    server.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds in-flight requests get on exit")
    rag = parser.add_argument_group("retrieval")
    rag.add_argument(
        "--rag-index",
        default=None,
        metavar="DIR",
        help="an index folder (python -m rag.index): serve POST /v1/rag/answer",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import uvicorn

    args = parse_args(argv)
    try:
        path, _ = resolve_model(args.model)
    except FileNotFoundError as error:
        raise SystemExit(f"error: --model {args.model}: {error}") from None
    rag_index = load_rag_index(args.rag_index) if args.rag_index else None  # before the model: fail fast
    engine = Engine.from_pretrained(
        path,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        max_queue=args.max_queue,
        token_budget=args.token_budget,
        window_policy=args.window_policy,
        compile=args.compile,
    )
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    loop = EngineLoop(engine).start()
    app = build_app(
        loop, model_name=name, api_key=args.api_key, shutdown_timeout=args.shutdown_timeout, rag_index=rag_index
    )
    print(f"Serving {path} as {name!r} on http://{args.host}:{args.port}/v1 (window {engine.max_seq_len} tokens)")
    if rag_index is not None:
        print(f"Grounded answers from {args.rag_index} ({len(rag_index)} chunks) at POST /v1/rag/answer")
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=int(args.shutdown_timeout) + 1
    )


if __name__ == "__main__":
    main()
