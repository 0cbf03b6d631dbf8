"""tiny_hf.chat: one chat-generation path. The engine and `generate()` give the same greedy replies, both stop at
the given ids (the end of the turn by default), and models the engine cannot run still get replies."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tiny_hf.chat import END_OF_TURN, _generate_batch, chat_generate, encode_prompts, end_of_turn_ids, make_engine

MESSAGES = [
    [{"role": "user", "content": "What does the json module do?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A list is"}],
    [{"role": "user", "content": "To open a file"}],
]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_end_of_turn_comes_first_then_eos(tiny):
    _, tokenizer = tiny
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]


def test_engine_and_generate_give_the_same_greedy_replies_and_stop_at_the_stop_id(tiny):
    model, tokenizer = tiny
    assert make_engine(model, tokenizer) is not None
    free = chat_generate(model, tokenizer, MESSAGES, max_new_tokens=12, stop_ids=[])
    assert all(len(r.token_ids) == 12 for r in free)
    stop = free[1].token_ids[4]  # a token the second reply emits: it must end there, the others where it appears
    by_engine = chat_generate(model, tokenizer, MESSAGES, max_new_tokens=12, stop_ids=[stop])
    ids = encode_prompts(tokenizer, MESSAGES)
    by_generate = _generate_batch(model, tokenizer, ids, 12, 0.0, [None] * 3, [stop])
    assert [r.token_ids for r in by_engine] == by_generate
    assert by_engine[1].token_ids == free[1].token_ids[: free[1].token_ids.index(stop) + 1]
    for full, cut in zip(free, by_engine, strict=True):
        expected = full.token_ids[: full.token_ids.index(stop) + 1] if stop in full.token_ids else full.token_ids
        assert cut.token_ids == expected
        assert cut.text == tokenizer.decode(cut.token_ids, skip_special_tokens=True).strip()


def test_seeded_sampling_repeats_and_other_models_go_through_generate(tiny, stock_llama_dir):
    model, tokenizer = tiny
    a = chat_generate(model, tokenizer, MESSAGES, max_new_tokens=8, temperature=1.0, seeds=[1, 2, 3])
    b = chat_generate(model, tokenizer, MESSAGES[::-1], max_new_tokens=8, temperature=1.0, seeds=[3, 2, 1])
    assert [r.token_ids for r in a] == [r.token_ids for r in b[::-1]]  # a reply does not depend on its batch
    # A stock Llama runs in the engine (through from_llama, sharing its weights), with generate()'s greedy replies.
    llama = AutoModelForCausalLM.from_pretrained(stock_llama_dir, dtype=torch.float32).train()
    assert make_engine(llama, tokenizer) is not None
    by_engine = chat_generate(llama, tokenizer, MESSAGES, max_new_tokens=6, stop_ids=[])
    by_generate = _generate_batch(llama.eval(), tokenizer, encode_prompts(tokenizer, MESSAGES), 6, 0.0, [None] * 3, [])
    assert [r.token_ids for r in by_engine] == by_generate
    # A model the engine cannot run (GPT-2) still gets replies, through generate().
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4)).train()
    assert make_engine(gpt2, tokenizer) is None
    replies = chat_generate(gpt2, tokenizer, MESSAGES, max_new_tokens=5)
    assert len(replies) == 3 and all(0 < len(r.token_ids) <= 5 for r in replies)
    assert gpt2.training  # the caller's mode is given back
