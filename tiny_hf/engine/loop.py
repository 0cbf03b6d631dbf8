"""Sharing one engine between threads and event loops: `engine.step()` runs in one background thread, so that many
callers (server handlers, UI sessions) share one running batch.

Why a thread and an inbox: only the loop's thread touches the engine's state, so callers hand requests and aborts
over without waiting for a step to end, and outputs come back through each caller's own queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from .engine import Engine
from .sampling import SamplingParams
from .sequence import QueueFullError, Request, RequestOutput


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
        self._inbox: list[Request] = []
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
