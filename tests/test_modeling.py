"""TinyForCausalLM and friends: every variant value through the same checks, transformers' contract, and
equivalence with transformers' own Llama and GPT-2 on copied weights."""

import pytest
import torch
from conftest import random_llama, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.cache_utils import DynamicCache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import tiny_hf
from tiny_hf import TinyConfig, TinyForCausalLM, TinyForSequenceClassification, TinyModel
from tiny_hf.configuration_tiny import BLOCK_TYPES, MLP_TYPES, NORM_TYPES, POSITION_EMBEDDINGS, PRESETS
from tiny_hf.convert import llama_config
from tiny_hf.modeling_tiny import ROPE_SCALINGS, alibi_slopes

# Every value of every variant field appears at least once; the rest stay at the defaults (rope, rmsnorm, swiglu,
# pre_norm). Plus the attention shapes (MQA, GQA), q/k norm, a sliding window and the scaled RoPE types.
VARIANTS = (
    [{"position_embedding": v} for v in POSITION_EMBEDDINGS]
    + [{"norm": v} for v in NORM_TYPES]
    + [{"mlp": v} for v in MLP_TYPES]
    + [{"block": v} for v in BLOCK_TYPES]
    + [
        {"num_key_value_heads": 1},
        {"num_key_value_heads": 2},
        {"qk_norm": True, "norm": "layernorm"},
        {"qk_norm": True},
        {"sliding_window": 4},
        {"sliding_window": 4, "position_embedding": "alibi", "block": "parallel"},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
        {"logit_softcap": 3.0},
        {"zero_init_output": True, "tie_word_embeddings": False},
        {
            "position_embedding": "learned",
            "norm": "layernorm",
            "mlp": "gelu",
            "attention_bias": True,
            "mlp_bias": True,
        },
    ]
)


def _id(variant: dict) -> str:
    return ",".join(f"{k}={v['rope_type'] if isinstance(v, dict) else v}" for k, v in variant.items())


def make_model(**overrides) -> TinyForCausalLM:
    return TinyForCausalLM(tiny_config(**overrides)).eval()


def _ids(batch=2, length=12, vocab=99):
    return torch.randint(3, vocab, (batch, length))


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_forward_shapes_and_loss(variant):
    model = make_model(**variant)
    ids = _ids()
    out = model(ids, labels=ids, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 12, 99)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 12, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 12, 12)
    # Causal: no probability mass on future keys, each row sums to one.
    probs = out.attentions[0]
    assert torch.all(probs.triu(1) == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 12))


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_loss_falls_on_a_fixed_batch(variant):
    model = make_model(**variant).train()
    ids = _ids(batch=4, length=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_cached_decoding_equals_full_forward(variant):
    model = make_model(**variant)
    ids = _ids(length=14)
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :6], cache=cache, use_cache=True).logits]  # prefill, then one token at a time
    steps += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(6, 10)]
    steps.append(model(ids[:, 10:], cache=cache, use_cache=True).logits)  # a chunk of 4 after the cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 14


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_left_padding_equals_unpadded(variant):
    model = make_model(**variant)
    rows = [_ids(1, 10)[0], _ids(1, 6)[0]]
    pad = model.config.pad_token_id
    batch = torch.full((2, 10), pad)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, -len(row) :], mask[i, -len(row) :] = row, 1
    padded = model(batch, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(padded[i, -len(row) :], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_eager_equals_sdpa(variant):
    eager = make_model(**variant, attn_implementation="eager")
    sdpa = make_model(**variant, attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row exercises the explicit-bias path
    for kwargs in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(sdpa(ids, **kwargs).logits, eager(ids, **kwargs).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "variant",
    [{}, {"position_embedding": "learned"}, {"position_embedding": "alibi"}, {"sliding_window": 4}],
    ids=_id,
)
def test_generate_cached_equals_uncached_and_padded_batch_equals_rows(variant):
    model = make_model(**variant)
    prompts = [_ids(1, 9)[0], _ids(1, 5)[0]]
    pad = model.config.pad_token_id
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=pad, eos_token_id=None)
    batch = torch.full((2, 9), pad)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, -len(p) :], mask[i, -len(p) :] = p, 1
    cached = model.generate(batch, attention_mask=mask, use_cache=True, **kwargs)
    uncached = model.generate(batch, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], use_cache=True, **kwargs)[0, len(p) :]
        assert torch.equal(cached[i, 9:], alone)


def test_sliding_window_generation_uses_the_sliding_cache():
    model = make_model(sliding_window=4)
    ids = _ids(1, 7)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, eos_token_id=None)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.layers[0].keys.shape[2] == 3  # window - 1 keys kept: the cache really slides
    reference = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, eos_token_id=None)
    assert torch.equal(out.sequences, reference)


def test_sampling_and_beam_search():
    model = make_model()
    ids = _ids(2, 5)
    torch.manual_seed(1)
    a = model.generate(ids, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=6, eos_token_id=None)
    torch.manual_seed(1)
    b = model.generate(ids, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(a, b) and a.shape == (2, 11)
    beams = model.generate(
        ids, num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    assert beams.shape == (4, 11)
    assert torch.equal(beams[:, :5], ids.repeat_interleave(2, dim=0))


def test_save_and_reload_keeps_tied_weights_and_logits(tmp_path):
    model = make_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, TinyForCausalLM)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = _ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "variant",
    [
        {"position_embedding": "sinusoidal"},
        {"position_embedding": "alibi"},
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
    ],
    ids=_id,
)
def test_reload_recomputes_non_persistent_buffers(tmp_path, variant):
    model = make_model(**variant)
    model.save_pretrained(tmp_path)
    reloaded = TinyForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_untied_embeddings_stay_untied(tmp_path):
    model = make_model(tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = TinyForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()


def test_auto_classes_are_registered(tmp_path):
    config = tiny_config(num_labels=3)
    assert isinstance(AutoConfig.for_model("tiny"), TinyConfig)
    assert isinstance(AutoModel.from_config(config), TinyModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), TinyForCausalLM)
    classifier = AutoModelForSequenceClassification.from_config(config)
    assert isinstance(classifier, TinyForSequenceClassification)
    classifier.save_pretrained(tmp_path)
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(tmp_path), TinyForSequenceClassification)


def test_sequence_classification_reads_the_last_real_token():
    model = TinyForSequenceClassification(tiny_config(num_labels=1)).eval()
    pad = model.config.pad_token_id
    row = _ids(1, 6)[0]
    right = torch.cat([row, torch.full((3,), pad)])[None]
    left = torch.cat([torch.full((3,), pad), row])[None]
    alone = model(row[None]).logits
    for ids in (right, left):
        mask = (ids != pad).long()
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, alone, atol=1e-5, rtol=1e-4)
    # Without a mask the last real token is found from pad_token_id (causal: right padding cannot change it).
    torch.testing.assert_close(model(right).logits, alone, atol=1e-5, rtol=1e-4)
    labels = torch.tensor([0.5])
    assert model(row[None], labels=labels).loss.ndim == 0  # num_labels=1: regression (a reward model)
    classifier = TinyForSequenceClassification(tiny_config(num_labels=3))
    out = classifier(_ids(2, 5), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model().train()
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # transformers >= 5.24 renamed gradient_checkpointing_enable.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], msg=name)


def test_dropout_is_active_in_training_only():
    model = make_model(hidden_dropout=0.5, attention_dropout=0.5)
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


# --- equivalence with transformers' own models -----------------------------------------------------------------------
def test_llama_shaped_model_is_llama():
    model = make_model(num_key_value_heads=2, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    llama = tiny_hf.to_llama(model)
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert set(llama.state_dict()) == set(model.state_dict())
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    torch.testing.assert_close(llama(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        llama(ids, attention_mask=mask).logits[1], model(ids, attention_mask=mask).logits[1], atol=1e-5, rtol=1e-4
    )
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(llama.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}])
def test_llama_equivalence_with_scaled_rope(rope):
    model = make_model(rope_parameters=rope)
    llama = tiny_hf.to_llama(model)
    ids = torch.randint(3, 99, (1, 60))
    torch.testing.assert_close(llama(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=2, tie_word_embeddings=True),  # GQA, tied head (SmolLM2's shape)
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        dict(attention_bias=True, mlp_bias=True, head_dim=16, rms_norm_eps=1e-5),
    ],
    ids=["gqa-tied", "mqa-untied-linear-rope", "biases-head-dim"],
)
def test_from_llama_gives_the_same_logits_and_shares_the_weights(overrides):
    llama = random_llama(**overrides)
    model = tiny_hf.from_llama(llama)
    assert isinstance(model, TinyForCausalLM)
    assert model.config.tie_word_embeddings == llama.config.tie_word_embeddings
    ids = torch.randint(3, 99, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits[0, 5:],
        llama(ids, attention_mask=mask).logits[0, 5:],
        atol=1e-5,
        rtol=1e-4,
    )
    # No copy: the converted model reads the Llama's own tensors, so a later change to one is seen by the other.
    assert model.model.layers[0].mlp.up_proj.weight.data_ptr() == llama.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == llama.config.tie_word_embeddings
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **kwargs), llama.generate(ids[:1], **kwargs))


def test_from_llama_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        tiny_hf.from_llama(random_llama(hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type='llama3'"):
        tiny_hf.from_llama(
            random_llama(
                rope_parameters={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "rope_theta": 10000.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            )
        )
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        tiny_hf.from_llama(gpt2)


def test_to_llama_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"norm='layernorm'.*mlp='gelu'"):
        llama_config(tiny_config(norm="layernorm", mlp="gelu"))
    with pytest.raises(ValueError, match="sliding_window=8"):
        llama_config(tiny_config(sliding_window=8))
    with pytest.raises(ValueError, match="logit_softcap=30.0"):
        llama_config(tiny_config(logit_softcap=30.0))
    assert not tiny_config(logit_softcap=30.0).is_llama_shaped


def test_logit_softcap_caps_the_heads_logits_smoothly():
    plain, capped = make_model(), make_model(logit_softcap=2.0)
    capped.load_state_dict(plain.state_dict())  # same weight names: only the head's forward differs
    ids = _ids()
    plain_logits, capped_logits = plain(ids).logits, capped(ids).logits
    torch.testing.assert_close(capped_logits, 2.0 * torch.tanh(plain_logits / 2.0))
    assert capped_logits.abs().max() < 2.0
    # Callers that apply the head themselves (the inference engine) get the capped logits too.
    hidden = capped.model(ids).last_hidden_state
    torch.testing.assert_close(capped.lm_head(hidden), capped_logits)


@pytest.mark.parametrize("tied", [True, False])
def test_zero_init_output_zeroes_the_residual_branches_and_an_untied_head(tmp_path, tied):
    model = make_model(zero_init_output=True, tie_word_embeddings=tied)
    for layer in model.model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.any() and layer.mlp.up_proj.weight.any()
    assert model.model.embed_tokens.weight.any()  # the token table (and a tied head) keeps its normal init
    assert model.lm_head.weight.any() == tied
    if not tied:  # an all-zero head: every token equally likely at step 0
        logits = model(_ids()).logits
        assert not logits.any()
    # Reloading keeps trained weights: the zero init applies to new models only.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path)
    reloaded = TinyForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def _gpt2_from_tiny(model: TinyForCausalLM) -> GPT2LMHeadModel:
    """Copy a GPT-2-shaped tiny model's weights into GPT2LMHeadModel (Conv1D stores weights transposed)."""
    c = model.config
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.max_position_embeddings,
            n_embd=c.hidden_size,
            n_layer=c.num_hidden_layers,
            n_head=c.num_attention_heads,
            n_inner=c.intermediate_size,
            activation_function="gelu_new",
            layer_norm_epsilon=c.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).eval()
    sd = {
        "transformer.wte.weight": model.model.embed_tokens.weight,
        "transformer.wpe.weight": model.model.embed_positions.weight,
    }
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = model.model.norm.weight, model.model.norm.bias
    for i, layer in enumerate(model.model.layers):
        a, m, p = layer.self_attn, layer.mlp, f"transformer.h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = layer.input_layernorm.weight, layer.input_layernorm.bias
        sd[p + "ln_2.weight"] = layer.post_attention_layernorm.weight
        sd[p + "ln_2.bias"] = layer.post_attention_layernorm.bias
        sd[p + "attn.c_attn.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T
        sd[p + "attn.c_attn.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = a.o_proj.weight.T, a.o_proj.bias
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = m.up_proj.weight.T, m.up_proj.bias
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = m.down_proj.weight.T, m.down_proj.bias
    sd["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = gpt2.load_state_dict({k: v.detach().contiguous() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(".attn.bias" in k or ".attn.masked_bias" in k for k in missing), missing
    return gpt2


def test_gpt2_shaped_model_is_gpt2():
    model = TinyForCausalLM(
        TinyConfig.from_preset(
            "gpt2-small",
            **dict(
                vocab_size=99,
                hidden_size=32,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            ),
        )
    ).eval()
    for param in model.parameters():  # biases start at zero: make them matter
        torch.nn.init.normal_(param, std=0.1) if param.ndim == 1 else None
    gpt2 = _gpt2_from_tiny(model)
    ids = _ids()
    torch.testing.assert_close(gpt2(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0},
        {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "beta_slow": 2},
    ],
)
def test_scaled_rope_frequencies_match_transformers(params):
    config = tiny_config(hidden_size=64, num_attention_heads=2, rope_parameters=dict(params))
    ours, our_scale = ROPE_SCALINGS[params["rope_type"]](config, 200)
    theirs, their_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](llama_config(config), seq_len=200)
    torch.testing.assert_close(ours, theirs)
    assert our_scale == pytest.approx(their_scale)


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4 slopes of n=4, then every other slope of n=8.
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected))


# --- presets and bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_their_advertised_size(name):
    expected = {
        "tiny-1m": 1e6,
        "tiny-3m": 3e6,
        "tiny-10m": 10e6,
        "tiny-30m": 30e6,
        "llama-60m": 60e6,
        "gpt2-small": 124e6,
    }
    config = TinyConfig.from_preset(name)
    with torch.device("meta"):
        n = TinyForCausalLM(config).num_parameters()
    assert 0.6 * expected[name] <= n <= 1.4 * expected[name], (name, n)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"norm": "batchnorm"}, r"norm='batchnorm' is not one of \['layernorm', 'rmsnorm'\]"),
        ({"position_embedding": "relative"}, r"position_embedding='relative' is not one of \['alibi'"),
        ({"mlp": "swish"}, r"mlp='swish' is not one of \['geglu', 'gelu'"),
        ({"block": "sandwich"}, r"block='sandwich' is not one of \['parallel', 'post_norm', 'pre_norm'\]"),
        ({"hidden_size": 30}, r"hidden_size=30 is not divisible by num_attention_heads=4"),
        ({"num_key_value_heads": 3}, r"num_attention_heads=4 is not divisible by num_key_value_heads=3"),
        ({"hidden_size": 36, "num_attention_heads": 4}, r"head_dim=9 is odd, but position_embedding='rope'"),
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, r"rope_type'\]='longrope' is not one of"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 0.5}}, r"factor'\]=0.5 must be a number >= 1"),
        ({"sliding_window": 0}, r"sliding_window=0 must be None or a positive integer"),
        ({"attention_dropout": 1.5}, r"attention_dropout=1.5 must be in \[0, 1\)"),
        ({"logit_softcap": 0}, r"logit_softcap=0 must be None or a positive number"),
        ({"logit_softcap": "30"}, r"logit_softcap='30' must be None or a positive number"),
        ({"zero_init_output": "yes"}, r"zero_init_output='yes' must be true or false"),
    ],
)
def test_bad_configs_name_the_field_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'; the presets: tiny-"):
        TinyConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match=r"unknown preset 'tiny-7m' \(did you mean tiny-3m\?\)"):
        TinyConfig.from_preset("tiny-7m")


def test_bad_inputs_raise_clear_errors():
    model = make_model(position_embedding="learned")
    with pytest.raises(ValueError, match="beyond max_position_embeddings=64"):
        model(torch.randint(3, 99, (1, 65)))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seq_len\)"):
        model(torch.randint(3, 99, (12,)))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected"):
        model(_ids(2, 6), attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_config_round_trips_and_accepts_legacy_rope_kwargs():
    config = tiny_config(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    again = TinyConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
