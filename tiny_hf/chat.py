"""Chat generation, the one way every stage does it: answers to chat prompts that stop at the end of the turn.

A chat model's turn ends with the template's end-of-turn token (`<|im_end|>` in ChatML, tiny_hf's template) and
only a plain language model's text ends with eos, so both stop generation. `chat_generate` runs the prompts through
tiny_hf's engine (continuous batching, one seeded generator per request) when it runs the model (tiny_hf's own, or
a Llama-family one through `from_llama`), and through transformers' `generate()` on left-padded batches otherwise
(any other causal LM: GPT-2, a PEFT-wrapped Llama).
SFT samples, GRPO/PPO rollouts, RAG answers and the comparison table all call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from .engine import Engine, SamplingParams
from .tokenization_tiny import IM_END

END_OF_TURN = IM_END  # the token that closes an assistant turn in the chat template
# How the project samples a chat reply by default (the Gradio chat's controls, a saved folder's generation config).
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}


@dataclass
class Reply:
    """One generated answer: its token ids (the stop token included when one was emitted) and its text (decoded
    without special tokens, stripped)."""

    token_ids: list[int]
    text: str


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an answer: the end-of-turn token when the vocabulary has it, then eos."""
    ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN)] if END_OF_TURN in tokenizer.get_vocab() else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def chat_generation_config(model, tokenizer) -> GenerationConfig | None:
    """The generation config a saved chat-capable causal LM carries, so that `generate()`, `pipeline(
    "text-generation")` and any tool reading generation_config.json stop at the end of the turn as well as at eos,
    and sample as the project's chat does (`CHAT_SAMPLING`). None for a model without a chat template or that does
    not generate (a reward model)."""
    if not model.can_generate() or not getattr(tokenizer, "chat_template", None):
        return None
    config = GenerationConfig.from_model_config(model.config)
    config.update(
        eos_token_id=end_of_turn_ids(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        do_sample=True,
        **CHAT_SAMPLING,
    )
    config._from_model_config = False  # chosen for the model, not derived from its config: generate() keeps it
    return config


def engine_model(model):
    """The causal LM the engine would run: `model` itself, or a PEFT model's base (its layers carry the injected,
    active LoRA modules); None when the engine cannot run it."""
    from .convert import engine_ready  # convert imports this module

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return engine_ready(lm)  # a Llama-family model runs as a TinyForCausalLM sharing its weights
    except (TypeError, ValueError):
        return None


def make_engine(model, tokenizer, batch_size: int = 32, **kwargs) -> Engine | None:
    """An engine for `model` (see `engine_model`) without a prefix cache, or None for a model it cannot run. Safe to
    reuse across optimizer steps: with the prefix cache off nothing in it outlives a request."""
    lm = engine_model(model)
    if lm is None:
        return None
    kwargs.setdefault("window_policy", "truncate")
    return Engine(lm, tokenizer, max_batch_size=batch_size, prefix_cache_tokens=0, **kwargs)


def encode_prompts(tokenizer, prompts: Sequence[Sequence[dict] | Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt: chat messages go through the chat template (with the generation prompt)."""
    return [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True, return_dict=False)
        if p and isinstance(p[0], dict)
        else list(p)
        for p in prompts
    ]


def chat_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict] | Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seeds: Sequence[int] | None = None,
    stop_ids: Sequence[int] | None = None,
    engine: Engine | None = None,
    batch_size: int = 32,
) -> list[Reply]:
    """One reply per prompt (chat messages or token ids), in order.

    Args:
        model: Any causal LM (a PEFT model too); in eval mode for the duration.
        tokenizer: Its tokenizer, with a chat template when the prompts are messages.
        max_new_tokens: Most tokens per reply.
        temperature: 0 for greedy decoding, else pure sampling (no top-k or top-p).
        seeds: One seed per prompt (the engine seeds each request; `generate()` seeds each batch by its first).
        stop_ids: The ids that end a reply (default: `end_of_turn_ids`); nothing else does.
        engine: Reuse this engine (built by `make_engine`) instead of building one.
        batch_size: Rows per `generate()` batch, and sequences the engine decodes together.
    """
    ids = encode_prompts(tokenizer, prompts)
    stop = list(stop_ids if stop_ids is not None else end_of_turn_ids(tokenizer))
    seeds = list(seeds) if seeds is not None else [None] * len(ids)
    was_training = model.training
    model.eval()
    try:
        engine = engine or make_engine(model, tokenizer, max(1, min(batch_size, len(ids))), max_queue=max(1, len(ids)))
        if engine is not None:
            params = [
                SamplingParams(
                    max_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop, ignore_eos=True, seed=s
                )
                for s in seeds
            ]
            rows = [c.token_ids for c in engine.generate(ids, params)]
        else:
            rows = []
            for start in range(0, len(ids), batch_size):
                batch = slice(start, start + batch_size)
                rows += _generate_batch(model, tokenizer, ids[batch], max_new_tokens, temperature, seeds[batch], stop)
    finally:
        model.train(was_training)
    return [Reply(list(r), tokenizer.decode(r, skip_special_tokens=True).strip()) for r in rows]


@torch.no_grad()
def _generate_batch(model, tokenizer, ids, max_new_tokens, temperature, seeds, stop) -> list[list[int]]:
    """`generate()` on one left-padded batch (every row continues at the same column), cut after the first stop."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)  # (B, T)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seeds[0] is not None:
            torch.manual_seed(seeds[0])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop or None,
            pad_token_id=pad,
            **sampling,
        )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows
