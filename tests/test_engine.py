"""The inference engine: greedy output identical to `generate()` under batching, chunked prefill, prefix caching and a
sliding-window ring cache; sampling filters equal transformers' processors; stop rules; window policies; errors."""

import asyncio
import threading

import pytest
import torch
from conftest import random_llama, tiny_config
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tiny_hf import TinyForCausalLM
from tiny_hf.engine import (
    ContextWindowError,
    Engine,
    EngineLoop,
    QueueFullError,
    SamplingParams,
    SpeculativeDecoder,
    apply_repetition_penalty,
    filter_logits,
    fit_messages,
    layer_skip_draft,
    sample,
)

GREEDY = dict(temperature=0, ignore_eos=True)
PROMPTS = [
    [5, 6, 7, 8, 9] * 4,
    [10, 11, 12],
    [5, 6, 7, 8, 9] * 4 + [3],  # shares a 16-token block with the first
    [40] * 7,
    list(range(3, 21)),
    [5, 6, 7, 8, 9] * 4 + [3, 7],
    [60, 61],
]


def sharp_model(**overrides) -> TinyForCausalLM:
    """A random tiny model with a rescaled head, so greedy choices are clear-cut."""
    model = TinyForCausalLM(tiny_config(tie_word_embeddings=False, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)
    return model


def generate_alone(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2
    )
    return out[0, len(prompt) :].cpu().tolist()


VARIANTS = {
    "rope": {},
    "alibi": dict(position_embedding="alibi"),
    "learned+gqa": dict(position_embedding="learned", num_key_value_heads=2),
    "sinusoidal+post_norm": dict(position_embedding="sinusoidal", block="post_norm", norm="layernorm"),
    "parallel+qk_norm+mqa": dict(block="parallel", qk_norm=True, num_key_value_heads=1),
    "sliding_window": dict(sliding_window=8),
    "dynamic_rope": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_equals_generate_with_batching_chunks_and_prefix_cache(variant):
    model = sharp_model(**VARIANTS[variant])
    # 3 slots for 7 requests (continuous batching), 7-token budget (chunked prefill), prefix cache on.
    engine = Engine(model, max_batch_size=3, token_budget=7)
    lengths = [12, 5, 9, 12, 3, 10, 1]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in lengths]
    results = engine.generate(PROMPTS, params)
    for prompt, n, result in zip(PROMPTS, lengths, results, strict=True):
        assert result.token_ids == generate_alone(model, prompt, n), prompt
        assert result.finish_reason == "length"
    assert engine.stats["cached_prompt_tokens"] > 0  # the shared 16-token block was reused
    assert not engine.has_unfinished() and all(owner is None for owner in engine.slot_owner)


def test_llama_family_models_run_in_the_engine_with_generates_tokens():
    """A stock LlamaForCausalLM (GQA, tied head) is served through from_llama: greedy tokens equal its generate()."""
    torch.manual_seed(0)
    llama = random_llama(num_key_value_heads=2, tie_word_embeddings=True)
    with torch.no_grad():
        llama.model.embed_tokens.weight.normal_(0, 1)
    engine = Engine(llama, max_batch_size=3, token_budget=7)
    results = engine.generate(PROMPTS[:4], SamplingParams(max_tokens=8, **GREEDY))
    for prompt, result in zip(PROMPTS[:4], results, strict=True):
        assert result.token_ids == generate_alone(llama, prompt, 8), prompt


def greedy_with_logprobs(engine: Engine, prompts: list[list[int]], n: int):
    """Greedy outputs and, per request, the log-probabilities (n, V) each of its tokens was chosen from."""
    logprobs: dict[str, list[torch.Tensor]] = {}
    accept = engine._accept

    def spy(batch, logits):
        for request, row in zip(batch, logits, strict=True):
            logprobs.setdefault(request.request_id, []).append(row.log_softmax(-1))
        return accept(batch, logits)

    engine._accept = spy
    results = engine.generate(prompts, SamplingParams(max_tokens=n, **GREEDY))
    return [r.token_ids for r in results], [torch.stack(logprobs[r.request_id]) for r in results]


@pytest.mark.parametrize("variant", ["rope", "alibi", "learned+gqa", "sliding_window", "dynamic_rope"])
def test_batched_prefill_equals_one_prompt_at_a_time(variant):
    """All seven prompts (2 to 22 tokens) are admitted in one step and prefilled in one right-padded forward; the
    tokens and log-probabilities equal those of an engine that prefills and decodes one prompt at a time."""
    model = sharp_model(**VARIANTS[variant])
    batched = Engine(model, max_batch_size=8, prefix_cache_tokens=0)
    shapes, forward = [], batched.runner.forward

    def spy(rows, ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return forward(rows, ids, *args, **kwargs)

    batched.runner.forward = spy
    tokens, logprobs = greedy_with_logprobs(batched, PROMPTS, 6)
    assert shapes[0] == (len(PROMPTS), max(len(p) for p in PROMPTS))  # one padded forward for every prompt
    alone_tokens, alone_logprobs = greedy_with_logprobs(
        Engine(model, max_batch_size=1, prefix_cache_tokens=0), PROMPTS, 6
    )
    assert tokens == alone_tokens
    for ours, theirs in zip(logprobs, alone_logprobs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["rope", "alibi", "learned+gqa", "sliding_window"])
def test_static_decode_for_cuda_graphs_equals_generate(variant):
    """The fixed-shape decode step that CUDA graphs replay (padded batch, keys over the whole window), run on the CPU:
    padding rows must not disturb live ones, including slots that are still computing their prompts."""
    model = sharp_model(**VARIANTS[variant])
    engine = Engine(model, max_batch_size=4, token_budget=7, static_decode=True)
    assert engine.static_decode
    lengths = [12, 5, 9, 12, 3, 10, 1]
    results = engine.generate(PROMPTS, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths])
    for prompt, n, result in zip(PROMPTS, lengths, results, strict=True):
        assert result.token_ids == generate_alone(model, prompt, n), prompt


@pytest.mark.slow
def test_compiled_decode_equals_generate():
    """The static step compiled by inductor (the CPU's stand-in for CUDA graphs) gives generate()'s greedy tokens, at
    batch 1 and with padded batches; sliding windows, which cannot use the static step, are refused."""
    model = sharp_model()
    engine = Engine(model, max_batch_size=4, token_budget=7, compile=True)
    assert engine.static_decode
    lengths = [6, 3, 6, 2]
    results = engine.generate(PROMPTS[:4], [SamplingParams(max_tokens=n, **GREEDY) for n in lengths])
    for prompt, n, result in zip(PROMPTS[:4], lengths, results, strict=True):
        assert result.token_ids == generate_alone(model, prompt, n), prompt
    with pytest.raises(ValueError, match="compile=True needs the static decode step"):
        Engine(sharp_model(sliding_window=8), window_policy="sliding", compile=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["rope", "learned+gqa"])
def test_cuda_graph_decode_equals_generate(variant):
    model = sharp_model(**VARIANTS[variant]).cuda()
    engine = Engine(model, max_batch_size=4)
    assert engine.cuda_graphs
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=8, **GREEDY))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == generate_alone(model, prompt, 8), prompt
    assert engine.runner._graphs  # the decode steps were replayed from captured graphs


def test_requests_joining_mid_flight_do_not_disturb_running_ones():
    model = sharp_model()
    engine = Engine(model, max_batch_size=4)
    first = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=20, **GREEDY))
    tokens = {first: []}
    for step in range(40):
        if step in (3, 6, 7):  # join while the first is decoding
            tokens[engine.add_request(PROMPTS[step - 2], SamplingParams(max_tokens=6 + step, **GREEDY))] = []
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert not engine.has_unfinished()
    expected = [generate_alone(model, PROMPTS[0], 20)] + [
        generate_alone(model, PROMPTS[s - 2], 6 + s) for s in (3, 6, 7)
    ]
    assert list(tokens.values()) == expected


def test_prefix_cache_hit_skips_prompt_compute_and_keeps_output():
    model = sharp_model()
    engine = Engine(model, max_batch_size=2)
    system = list(range(3, 35))  # two full blocks
    a = engine.generate([system + [40, 41]], SamplingParams(max_tokens=5, **GREEDY))[0]
    b = engine.generate([system + [50]], SamplingParams(max_tokens=5, **GREEDY))[0]
    assert engine.stats["cached_prompt_tokens"] == 32
    assert a.token_ids == generate_alone(model, system + [40, 41], 5)
    assert b.token_ids == generate_alone(model, system + [50], 5)
    assert engine.metrics()["prefix_cache_hit_rate"] > 0


def test_sliding_window_ring_cache_generates_past_the_cache_length():
    model = sharp_model(sliding_window=8)
    engine = Engine(model, max_batch_size=2, max_seq_len=24, window_policy="sliding", token_budget=5)
    prompt = list(range(3, 23))  # 20 tokens, then 30 more: 50 positions in a 24-entry ring
    out = engine.generate([prompt, [7, 8, 9]], SamplingParams(max_tokens=30, **GREEDY))
    assert out[0].token_ids == generate_alone(model, prompt, 30)
    assert out[1].token_ids == generate_alone(model, [7, 8, 9], 30)


def test_window_policies():
    model = sharp_model()
    reject = Engine(model, max_seq_len=32)
    with pytest.raises(ContextWindowError, match=r"context window is 32 tokens.*40 .*30 in the prompt, 10 for"):
        reject.add_request(list(range(3, 33)), SamplingParams(max_tokens=10))
    # Without max_tokens a prompt that fits runs until the window is full.
    out = reject.generate([list(range(3, 23))], SamplingParams(**GREEDY))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 32 - 20

    truncate = Engine(model, max_seq_len=32, window_policy="truncate")
    prompt = list(range(3, 43))
    out = truncate.generate([prompt], SamplingParams(max_tokens=10, **GREEDY))[0]
    assert out.prompt_token_ids == prompt[-22:]  # the oldest tokens went, room for 10 is left
    assert out.token_ids == generate_alone(model, prompt[-22:], 10)

    with pytest.raises(ValueError, match="sliding_window"):
        Engine(model, window_policy="sliding")
    with pytest.raises(ValueError, match="window_policy='wrap' is not one of"):
        Engine(model, window_policy="wrap")


def test_fit_messages_drops_oldest_turns_but_keeps_the_system_prompt(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    messages = [{"role": "system", "content": "You answer questions about Python."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "ok " * 5}]
    messages.append({"role": "user", "content": "last question"})
    full, _ = fit_messages(tokenizer, messages, budget=10_000, policy="truncate")
    ids, dropped = fit_messages(tokenizer, messages, budget=len(full) // 2, policy="truncate")
    assert len(ids) <= len(full) // 2 and dropped > 0
    text = tokenizer.decode(ids)
    assert "You answer questions about Python." in text and "last question" in text and "question 0" not in text
    with pytest.raises(ContextWindowError, match="system prompt and the last message"):
        fit_messages(tokenizer, messages, budget=5, policy="truncate")


@pytest.mark.parametrize("k,p,m", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.2), (7, 0.9, 0.05)])
def test_filters_equal_transformers_warpers(k, p, m):
    logits = torch.randn(4, 50) * 3
    ours = filter_logits(logits, top_k=torch.tensor([k] * 4), top_p=torch.tensor([p] * 4), min_p=torch.tensor([m] * 4))
    theirs = logits.clone()
    if k:
        theirs = TopKLogitsWarper(k)(None, theirs)
    if p < 1:
        theirs = TopPLogitsWarper(p)(None, theirs)
    if m > 0:
        theirs = MinPLogitsWarper(m)(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    assert torch.equal(ours[kept], logits[kept])


def test_repetition_penalty_equals_transformers():
    logits = torch.randn(2, 30)
    seen_ids = torch.tensor([[1, 5, 7, 7], [2, 3, 4, 29]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter(1, seen_ids, True)
    ours = apply_repetition_penalty(logits, seen, torch.tensor([[1.3], [1.3]]))
    assert torch.allclose(ours, RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone()))


def test_inverse_cdf_sampling_follows_the_probabilities_and_each_generator():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(20_000, 4)
    counts = torch.bincount(sample(probs, [None] * len(probs)), minlength=4) / len(probs)
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)
    assert counts[1] == 0  # a filtered token (probability 0) is never drawn

    def draws(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([sample(probs[: len(seeds)], generators) for _ in range(50)], dim=1)  # (rows, 50)

    three = draws([1, 2, 1])
    assert torch.equal(three[0], three[2]) and not torch.equal(three[0], three[1])
    assert torch.equal(draws([1])[0], three[0])  # a row's samples depend on its generator only


def test_top_k_1_is_greedy_and_seeded_sampling_ignores_the_batch():
    model = sharp_model()
    greedy = Engine(model).generate(PROMPTS[:2], SamplingParams(max_tokens=8, **GREEDY))
    top1 = Engine(model).generate(PROMPTS[:2], SamplingParams(max_tokens=8, top_k=1, ignore_eos=True))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in top1]

    seeded = SamplingParams(max_tokens=12, temperature=1.5, seed=123, ignore_eos=True)
    alone = Engine(model).generate([PROMPTS[1]], seeded)[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=1.5, ignore_eos=True)
    batched = Engine(model).generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], [others, seeded, others])[1].token_ids
    assert alone == batched
    other_seed = (
        Engine(model)
        .generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=1.5, seed=124, ignore_eos=True))[0]
        .token_ids
    )
    assert other_seed != alone


def test_stop_ids_stop_strings_and_streamed_text(tiny_lm_dir):
    engine = Engine.from_pretrained(str(tiny_lm_dir))
    params = SamplingParams(max_tokens=40, **GREEDY)
    full = engine.generate(["The json module"], params)[0]
    deltas = list(engine.stream("The json module", params))
    assert "".join(d.text for d in deltas) == full.text and deltas[-1].finished
    assert sum(len(d.token_ids) for d in deltas) == len(full.token_ids) == 40

    stop = full.text[10:13]
    cut = engine.generate(["The json module"], SamplingParams(max_tokens=40, stop=[stop], **GREEDY))[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(
        d.text for d in engine.stream("The json module", SamplingParams(max_tokens=40, stop=[stop], **GREEDY))
    )
    assert streamed == cut.text  # the held-back characters never leaked the stop string

    stop_id = full.token_ids[5]
    ids = engine.generate(["The json module"], SamplingParams(max_tokens=40, stop_token_ids=[stop_id], **GREEDY))
    assert ids[0].token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert ids[0].finish_reason == "stop"


def test_abort_frees_the_slot_and_queue_is_bounded():
    engine = Engine(sharp_model(), max_batch_size=1, max_queue=2)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=40, **GREEDY))
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    engine.add_request(PROMPTS[2], SamplingParams(max_tokens=3, **GREEDY))
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request(PROMPTS[3])
    engine.abort(a)
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished[a] == "abort" and list(finished.values()).count("length") == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_k", -2),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("repetition_penalty", 0),
        ("stop", [""]),
    ],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        SamplingParams(**{field: value})


def test_bad_requests_and_models_get_clear_errors():
    engine = Engine(sharp_model())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([5, 500])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="needs the engine to have a tokenizer"):
        engine.add_request("text")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(TypeError, match="GPT2LMHeadModel is neither: use model.generate"):
        Engine(gpt2)
    with pytest.raises(ValueError, match="beyond the 'learned' position table"):
        Engine(sharp_model(position_embedding="learned"), max_seq_len=1000)


def test_engine_loop_serves_threads_and_asyncio_together(tiny_lm_dir):
    engine = Engine.from_pretrained(str(tiny_lm_dir), max_batch_size=4)
    prompts = ["The json module", "A tuple is", "lambda", "class", "import os"]
    expected = {
        p: r.text
        for p, r in zip(prompts, engine.generate(prompts, SamplingParams(max_tokens=10, **GREEDY)), strict=True)
    }
    loop = EngineLoop(engine).start()
    got = {}

    def worker(prompt):
        got[prompt] = "".join(d.text for d in loop.stream(prompt, SamplingParams(max_tokens=10, **GREEDY)))

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts[:3]]
    for t in threads:
        t.start()

    async def both():
        async def one(prompt):
            return "".join([d.text async for d in loop.astream(prompt, SamplingParams(max_tokens=10, **GREEDY))])

        return await asyncio.gather(*(one(p) for p in prompts[3:]))

    got.update(zip(prompts[3:], asyncio.run(both()), strict=True))
    for t in threads:
        t.join()
    assert got == expected

    # Shutdown: a request still running when the timeout is over is aborted; new requests are refused.
    outputs = []
    loop.submit("The", SamplingParams(max_tokens=250, ignore_eos=True), outputs.append)
    loop.shutdown(timeout=0)
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    with pytest.raises(RuntimeError, match="not running"):
        loop.submit("The", None, outputs.append)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("draft_kind", ["layer_skip", "other_model"])
def test_speculative_decoding_gives_the_targets_greedy_tokens(k, draft_kind):
    target = sharp_model(num_hidden_layers=3, num_key_value_heads=2)
    if draft_kind == "layer_skip":
        draft = layer_skip_draft(target, 1)
        assert draft.model.layers[0] is target.model.layers[0]  # shares the target's weights
    else:
        torch.manual_seed(1)
        draft = sharp_model(hidden_size=16, num_hidden_layers=1)
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=k)
    for prompt in PROMPTS:
        assert decoder.generate(prompt, 13) == generate_alone(target, prompt, 13), prompt
    assert 0 <= decoder.accepted <= decoder.proposed and decoder.target_forwards >= 13 * len(PROMPTS) / (k + 1)
    stop = generate_alone(target, PROMPTS[0], 13)[5]
    out = decoder.generate(PROMPTS[0], 13, stop_token_ids=[stop])
    assert out[-1] == stop and stop not in out[:-1]


def test_speculative_decoding_with_itself_as_draft_accepts_everything():
    target = sharp_model()
    decoder = SpeculativeDecoder(target, target, num_speculative_tokens=4)
    assert decoder.generate(PROMPTS[1], 20) == generate_alone(target, PROMPTS[1], 20)
    assert decoder.acceptance_rate == 1.0 and decoder.target_forwards == 4  # 5 tokens per target forward


def test_speculative_decoding_bad_input():
    target = sharp_model(num_hidden_layers=2)
    with pytest.raises(ValueError, match="num_speculative_tokens=0 must be an integer >= 1"):
        SpeculativeDecoder(target, target, num_speculative_tokens=0)
    with pytest.raises(ValueError, match="differs from the target's"):
        SpeculativeDecoder(target, sharp_model(vocab_size=50))
    with pytest.raises(ValueError, match=r"num_layers=2 must be in \[1, 1\]"):
        layer_skip_draft(target, 2)
    with pytest.raises(ValueError, match="leave room for max_tokens=60"):
        SpeculativeDecoder(target, target).generate(list(range(3, 13)), 60)


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "static"])
def test_multi_step_decoding_equals_generate_and_stops_mid_chunk(static_decode):
    """decode_steps=4: four greedy tokens per engine step; lengths that are not multiples of 4, a stop id met inside a
    chunk and the end of the window give the tokens of one step at a time."""
    model = sharp_model(num_key_value_heads=2)
    engine = Engine(model, max_batch_size=3, token_budget=7, static_decode=static_decode, decode_steps=4)
    lengths = [12, 5, 9, 13, 3, 10, 1]
    results = engine.generate(PROMPTS, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths])
    for prompt, n, result in zip(PROMPTS, lengths, results, strict=True):
        assert result.token_ids == generate_alone(model, prompt, n), prompt
    assert engine.stats["steps"] < sum(lengths)  # several tokens per step
    expected = generate_alone(model, PROMPTS[0], 12)
    stop = expected[6]
    got = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop]))[0]
    assert got.token_ids == expected[: expected.index(stop) + 1] and got.finish_reason == "stop"
    window = engine.generate([PROMPTS[4]], SamplingParams(**GREEDY))[0]  # runs to the end of the 64-token window
    assert window.token_ids == generate_alone(model, PROMPTS[4], len(window.token_ids))
    assert len(PROMPTS[4]) + len(window.token_ids) == 64 and window.finish_reason == "length"
    with pytest.raises(ValueError, match="decode_steps=0 must be an integer >= 1"):
        Engine(model, decode_steps=0)
