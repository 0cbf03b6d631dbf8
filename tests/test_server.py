"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client (and raw HTTP for what the
client cannot send, and for the grounded answers of /v1/rag/answer). Answers are checked against `generate()` on the
same weights."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import hypothesis
import openai
import pytest
import schemathesis
import torch
import uvicorn
from conftest import RAG_QUESTION, free_port
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.server import build_app
from rag.answer import grounded_prompt
from tiny_hf.engine import Engine, EngineLoop

# One worker serves the whole module (under `pytest -n 2 --dist loadgroup`), so the app starts once.
pytestmark = pytest.mark.xdist_group("server")

ROOT = Path(__file__).resolve().parent.parent


class LiveServer:
    """uvicorn in a thread, serving `build_app` for an engine over the tiny model."""

    def __init__(self, model_dir, api_key=None, rag_index=None, **engine_kwargs):
        self.engine = Engine.from_pretrained(str(model_dir), device="cpu", **engine_kwargs)
        self.loop = EngineLoop(self.engine).start()
        app = build_app(self.loop, model_name="tiny", api_key=api_key, shutdown_timeout=5, rag_index=rag_index)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs
        )

    def metrics(self) -> dict:
        """/metrics through Prometheus' own parser: {name: value} of the unlabelled samples."""
        families = text_string_to_metric_families(httpx.get(self.url + "/metrics").text)
        samples = (sample for family in families for sample in family.samples if not sample.labels)
        return {s.name.removeprefix("tiny_hf_").removesuffix("_total"): s.value for s in samples}

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_lm_dir):
    live = LiveServer(tiny_lm_dir, max_batch_size=8, max_seq_len=128)
    yield live
    live.close()


@pytest.fixture(scope="module")
def reference(tiny_lm_dir):
    """Greedy continuations by transformers' `generate()` on the same weights, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)

    def continuation(prompt_ids: list[int], max_tokens: int, stop_ids=(0,)) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[0, len(prompt_ids) :].tolist()

    continuation.tokenizer = tokenizer
    return continuation


def expected_text(reference, prompt_ids, max_tokens, stop_ids=(0,)):
    return reference.tokenizer.decode(reference(prompt_ids, max_tokens, stop_ids), skip_special_tokens=True)


def test_health_models_and_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    before = server.metrics()
    assert {"queue_length", "running", "tokens_per_second", "generated_tokens"} <= before.keys()
    server.client().completions.create(model="tiny", prompt="The json module", max_tokens=3)
    after = server.metrics()  # one more request timed: time to first token and latency histograms
    for histogram in ("time_to_first_token_seconds", "request_latency_seconds"):
        assert after[f"{histogram}_count"] == before[f"{histogram}_count"] + 1, (histogram, before, after)
        assert after[f"{histogram}_sum"] > before[f"{histogram}_sum"]


def test_completion_matches_generate(server, reference):
    prompt = "The json module"
    ids = reference.tokenizer(prompt).input_ids
    out = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_text(reference, ids, 12)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens == len(reference(ids, 12))


def test_completion_of_several_prompts_and_token_ids(server, reference):
    prompts = ["A dictionary is", "To read a file, use"]
    out = server.client().completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    for prompt, choice in zip(prompts, out.choices, strict=True):
        assert choice.text == expected_text(reference, reference.tokenizer(prompt).input_ids, 6)
    ids = reference.tokenizer("lambda").input_ids
    out = server.client().completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert out.choices[0].text == expected_text(reference, ids, 5)


def test_chat_and_streamed_chat_agree_with_generate(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]
    tokenizer = reference.tokenizer
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    want = expected_text(reference, list(ids), 20, stop_ids=(0, end))

    client = server.client()
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [out.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_streamed_completion_and_stop_strings(server, reference):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0).choices[0].text
    streamed = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    args = dict(model="tiny", prompt="The json module", max_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.completions.create(**args).choices[0].text for _ in range(2))
    assert a == b


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=5.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(extra_body={"top_k": -1}), "top_k"),
        (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
        (dict(n=2), "n"),
    ],
)
def test_out_of_range_parameters_are_400_naming_the_field(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        server.client().completions.create(model="tiny", prompt="x", **kwargs)
    assert error.value.status_code == 400
    assert param in error.value.body["message"]
    assert error.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as error:
        server.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["code"] == "model_not_found"
    assert "gpt-4" in error.value.body["message"]


def test_prompt_over_the_window_is_400_context_length_exceeded(server):
    long = "word " * 400  # well over the 128-token window
    with pytest.raises(openai.BadRequestError) as error:
        server.client().completions.create(model="tiny", prompt=long, max_tokens=5)
    assert error.value.body["code"] == "context_length_exceeded"
    assert "128" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}])
    assert error.value.body["code"] == "context_length_exceeded"


def test_malformed_requests_get_openai_error_bodies(server):
    for body in (
        b"{not json",
        b'{"model": "tiny"}',
        b'{"model": "tiny", "messages": []}',
        b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}',
    ):
        response = httpx.post(
            server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": []})
    assert response.status_code == 400 and "empty" in response.json()["error"]["message"]


def test_n_above_one_is_a_clear_400(server):
    with pytest.raises(openai.BadRequestError) as error:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3)
    assert error.value.body["param"] == "n"
    assert error.value.body["message"].startswith("n: n=3 is not supported: this server returns one choice")


def test_empty_prompt_starts_from_the_start_of_text_token(server, reference):
    tokenizer = reference.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = server.client().completions.create(model="tiny", prompt="", max_tokens=8, temperature=0)
    assert out.usage.prompt_tokens == 1
    assert out.choices[0].text == expected_text(reference, [start], 8)
    chat = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": ""}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_the_last_token_of_the_window(server, reference):
    """A prompt one token short of the 128-token window gets exactly one token, asked for or not."""
    ids = (reference.tokenizer("word " * 200).input_ids * 2)[:127]
    for max_tokens in (1, None):
        out = server.client().completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0)
        assert out.usage.completion_tokens == 1 and out.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as error:
        server.client().completions.create(model="tiny", prompt=ids, max_tokens=2)
    assert error.value.body["code"] == "context_length_exceeded"


def test_stop_strings_longer_than_the_output_change_nothing(server):
    client = server.client()
    args = dict(model="tiny", prompt="The", max_tokens=10, temperature=0)
    full = client.completions.create(**args).choices[0]
    long_stops = [full.text + "x" * 50, "never appears " * 20]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(**args, stop=long_stops, stream=True))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            cut = client.completions.create(**args, stop=long_stops).choices[0]
            text, reason = cut.text, cut.finish_reason
        assert (text, reason) == (full.text, full.finish_reason)


def test_characters_split_across_tokens_stream_whole(tiny_lm_dir, monkeypatch):
    """The engine made to write a text whose characters are several byte-level tokens each: every streamed chunk
    holds whole characters (no U+FFFD), and the chunks add up to the text, streamed or not."""
    live = LiveServer(tiny_lm_dir, max_batch_size=2, max_seq_len=128)
    try:
        text = "naïve → 🙂 ok"
        script = live.engine.tokenizer(text, add_special_tokens=False).input_ids
        assert any("\ufffd" in live.engine.tokenizer.decode([t]) for t in script)  # the text really splits
        eos = live.engine.tokenizer.eos_token_id
        monkeypatch.setattr(
            live.engine, "_sample", lambda batch, logits: [(script + [eos])[len(r.output_ids)] for r in batch]
        )
        client = live.client()
        args = dict(model="tiny", prompt="The", max_tokens=len(script) + 1)
        assert client.completions.create(**args).choices[0].text == text
        chunks = [c.choices[0].text for c in client.completions.create(**args, stream=True)]
        assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    finally:
        live.close()


def test_a_stock_llama_folder_is_served_by_the_engine(stock_llama_dir):
    """A transformers Llama folder runs in the engine (through from_llama): the server's greedy completion has
    generate()'s tokens."""
    live = LiveServer(stock_llama_dir, max_batch_size=2, max_seq_len=128)
    try:
        assert type(live.engine.model).__name__ == "TinyForCausalLM"
        llama = AutoModelForCausalLM.from_pretrained(stock_llama_dir, dtype=torch.float32).eval()
        tokenizer = live.engine.tokenizer
        prompt = tokenizer("The json module", add_special_tokens=False).input_ids
        out = llama.generate(
            torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )
        expected = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        args = dict(
            model="tiny", prompt="The json module", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert live.client().completions.create(**args).choices[0].text == expected
    finally:
        live.close()


def test_api_key_is_required_when_set(tiny_lm_dir):
    live = LiveServer(tiny_lm_dir, api_key="s3cret", max_batch_size=2, max_seq_len=64)
    try:
        with pytest.raises(openai.AuthenticationError) as error:
            live.client(api_key="wrong").models.list()
        assert error.value.status_code == 401
        assert live.client(api_key="s3cret").models.list().data[0].id == "tiny"
        assert httpx.get(live.url + "/health").status_code == 200  # health stays open for load balancers
    finally:
        live.close()


def test_full_queue_answers_429_and_others_complete(tiny_lm_dir):
    live = LiveServer(tiny_lm_dir, max_batch_size=1, max_queue=1, max_seq_len=256)
    try:
        client = live.client()

        def ask(_):
            try:
                out = client.completions.create(
                    model="tiny", prompt="The", max_tokens=150, temperature=0, extra_body={"ignore_eos": True}
                )
                return out.usage.completion_tokens
            except openai.RateLimitError as error:
                assert error.body["code"] == "queue_full"
                return 429

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, range(6)))
        assert 429 in results
        assert all(r in (150, 429) for r in results) and 150 in results
    finally:
        live.close()


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics()["generated_tokens"]
    body = {"model": "tiny", "prompt": "The", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event; then hang up
    deadline = time.monotonic() + 30
    while server.metrics()["running"] > 0:
        assert time.monotonic() < deadline, "the aborted request kept its slot"
        time.sleep(0.05)
    assert server.metrics()["generated_tokens"] - before < 120


def test_concurrent_load_every_answer_matches_its_request(server, reference):
    """64 requests, 16 at a time, each with its own prompt and length: no errors, and every answer is exactly the
    one `generate()` gives for that prompt alone (no cross-talk between batch rows or cache slots)."""
    words = ["json", "tuple", "lambda", "yield", "class", "import", "while", "dict"]
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(1 + i % 5)) for i in range(64)]
    lengths = [4 + i % 9 for i in range(64)]
    client = server.client()

    def ask(i):
        out = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(64)))
    for prompt, n, answer in zip(prompts, lengths, answers, strict=True):
        assert answer == expected_text(reference, reference.tokenizer(prompt).input_ids, n), prompt


@pytest.mark.slow
def test_cli_serves_and_shuts_down_gracefully(tiny_lm_dir, tmp_path):
    """`python -m app.server` in its own process: SIGTERM while a stream is running lets it finish, then exits."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.server",
            "--model",
            str(tiny_lm_dir),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--max-seq-len",
            "256",
            "--shutdown-timeout",
            "60",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        body = {"model": "tiny", "prompt": "The", "max_tokens": 100, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 1:
                    proc.send_signal(signal.SIGTERM)
        chunks = [json.loads(e[len("data: ") :]) for e in events if e != "data: [DONE]"]
        assert events[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete, so the exit status says "terminated".
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------------------------------------
# Grounded answers: POST /v1/rag/answer (with --rag-index)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rag_server(tiny_lm_dir, rag_index):
    live = LiveServer(tiny_lm_dir, rag_index=rag_index, max_batch_size=4, max_seq_len=256)
    yield live
    live.close()


def ask(live, **body) -> httpx.Response:
    return httpx.post(live.url + "/v1/rag/answer", json=body, timeout=60)


def test_rag_answer_is_generated_from_the_retrieved_passages(rag_server, rag_index, reference):
    response = ask(rag_server, question=RAG_QUESTION, k=3, mode="bm25", max_tokens=4)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"answer", "citations", "sources", "dropped", "usage"}
    sources, hits = out["sources"], rag_index.search(RAG_QUESTION, k=3, mode="bm25")
    assert len(sources) == 2 and out["dropped"] == 1 and len(hits) == 3  # the third passage did not fit
    assert sources[0]["doc_id"] == "json"  # the one document that shares the question's words
    for number, (source, hit) in enumerate(zip(sources, hits, strict=False), start=1):
        assert source["number"] == number
        assert (source["doc_id"], source["chunk_index"], source["text"]) == (hit.doc_id, hit.chunk_index, hit.text)
        assert source["score"] == pytest.approx(hit.score)
    assert all(c in sources for c in out["citations"])
    # The same prompt through generate(): greedy, stopping at the end of the turn, as the chat route does.
    tokenizer = reference.tokenizer
    ids, _, _ = grounded_prompt(RAG_QUESTION, rag_index, tokenizer, window=256, k=3, mode="bm25", max_new_tokens=4)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out["answer"] == expected_text(reference, ids, 4, stop_ids=(0, end)).strip()
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert 1 <= out["usage"]["completion_tokens"] <= 4
    assert out["usage"]["total_tokens"] == len(ids) + out["usage"]["completion_tokens"]


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_rag_answer_retrieves_by_the_mode_asked(rag_server, rag_index, mode):
    out = ask(rag_server, question=RAG_QUESTION, k=2, mode=mode, max_tokens=4).json()
    hits = rag_index.search(RAG_QUESTION, k=2, mode=mode)
    assert [(s["chunk_index"], s["score"]) for s in out["sources"]] == [
        (h.chunk_index, pytest.approx(h.score)) for h in hits[: len(out["sources"])]
    ]


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"question": ""}, "the question is empty", None),
        ({"question": "   "}, "the question is empty", None),
        ({}, "question: Field required", "question"),
        ({"question": "json", "k": 0}, "k: Input should be greater than or equal to 1", "k"),
        ({"question": "json", "mode": "fuzzy"}, "mode: Input should be 'bm25', 'dense' or 'hybrid'", "mode"),
        ({"question": "json", "max_tokens": 256}, "leaves no room for a prompt in the 256-token window", None),
        ({"question": "why " * 400, "mode": "bm25"}, "without any passage", "question"),
    ],
)
def test_rag_answer_bad_input_is_400_with_a_message(rag_server, body, message, param):
    response = ask(rag_server, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert error["param"] == param
    if "without any passage" in message:
        assert error["code"] == "context_length_exceeded"


def test_rag_route_is_absent_without_an_index(server):
    assert ask(server, question=RAG_QUESTION).status_code == 404


# ---------------------------------------------------------------------------------------------------------------------
# Fuzz: schemathesis sends requests generated from the app's own OpenAPI schema (fitting it and not) to every route
# ---------------------------------------------------------------------------------------------------------------------
FUZZ_EXAMPLES = 40  # per route and generation mode


@pytest.fixture(scope="module")
def fuzz_counts():
    counts = {}
    yield counts
    print("\nfuzz: responses by route and status:", json.dumps(counts, sort_keys=True))


# The schema of the app with every route (the routes and request models fix it; no engine is needed to build it).
OPENAPI = build_app(None, model_name="tiny", rag_index=True).openapi()
fuzzed = schemathesis.openapi.from_dict(OPENAPI)
fuzzed.config.generation.update(max_examples=FUZZ_EXAMPLES)


@fuzzed.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck), derandomize=True)
def test_fuzzed_requests_get_no_5xx_and_every_error_has_the_openai_body(case, rag_server, fuzz_counts):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = (
            "tiny"  # past the model check, into generation (unknown models: test_unknown_model_is_404)
        )
    response = case.call(base_url=rag_server.url, timeout=60)
    route = f"{case.method} {case.path}"
    fuzz_counts.setdefault(route, {}).setdefault(str(response.status_code), 0)
    fuzz_counts[route][str(response.status_code)] += 1
    assert response.status_code < 500, (route, case.body, response.text)
    if response.status_code >= 400:
        error = response.json().get("error", {})
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (route, response.text)
        assert error["type"] in ("invalid_request_error", "authentication_error", "rate_limit_error")
