"""Tests for alignment/rl.py, the PPO core: hand-worked GAE and losses, KL estimators against the true KL, and the
invariants PPO implementations get wrong (ratio 1 before the first update, sampling log-probs == training log-probs,
padding-independence, the score on EOS)."""

import copy

import pytest
import torch
from conftest import random_llama, tiny_config
from transformers import LlamaForCausalLM

from alignment.rl import (
    AdaptiveKLController,
    FixedKLController,
    ValueHeadModel,
    entropy_from_logits,
    eos_penalty,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    policy_forward,
    policy_loss,
    position_ids_from_mask,
    response_mask_from_start,
    sequence_logprobs,
    truncate_response,
    value_loss,
    whiten,
)
from tiny_hf import TinyForCausalLM

EOS, PAD = 0, 2  # tiny_config()'s eos_token_id and pad_token_id


def tiny_llama() -> LlamaForCausalLM:
    return random_llama(num_key_value_heads=2, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)


def tiny_policy() -> ValueHeadModel:
    return ValueHeadModel(TinyForCausalLM(tiny_config())).eval()


# ---------------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------------
# gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), rewards r = [0, 0, 1], values V = [0.5, 0.4, 0.2], no bootstrap after
# the last token:
#   t=2: delta = 1 + 0.9 * 0   - 0.2 =  0.80   A2 = 0.80
#   t=1: delta = 0 + 0.9 * 0.2 - 0.4 = -0.22   A1 = -0.22 + 0.72 * 0.80  =  0.356
#   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14   A0 = -0.14 + 0.72 * 0.356 =  0.11632
#   returns = A + V = [0.61632, 0.756, 1.0]
GAE_REWARDS, GAE_VALUES = [0.0, 0.0, 1.0], [0.5, 0.4, 0.2]
GAE_ADVANTAGES, GAE_RETURNS = [0.11632, 0.356, 0.8], [0.61632, 0.756, 1.0]


def test_gae_hand_worked():
    rewards, values = torch.tensor([GAE_REWARDS]), torch.tensor([GAE_VALUES])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([GAE_ADVANTAGES]))
    torch.testing.assert_close(returns, torch.tensor([GAE_RETURNS]))


def test_gae_ignores_prompt_and_padding():
    # Row 0: 2 prompt tokens, the 3 response tokens, 2 pads; row 1: 4 prompt tokens, then the response. Whatever sits
    # in the masked entries (here large junk) must not change the response's advantages.
    junk = 100.0
    rewards = torch.full((2, 7), junk)
    values = torch.full((2, 7), -junk)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    for row, start in ((0, 2), (1, 4)):
        rewards[row, start : start + 3] = torch.tensor(GAE_REWARDS)
        values[row, start : start + 3] = torch.tensor(GAE_VALUES)
        mask[row, start : start + 3] = True
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row, start in ((0, 2), (1, 4)):
        torch.testing.assert_close(advantages[row, start : start + 3], torch.tensor(GAE_ADVANTAGES))
        torch.testing.assert_close(returns[row, start : start + 3], torch.tensor(GAE_RETURNS))
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    advantages, returns = gae(rewards, values, torch.ones(3, 6), gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(returns, reward_to_go)
    torch.testing.assert_close(advantages, reward_to_go - values)


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators and rewards
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_zero_when_equal(estimator):
    logp = torch.randn(4, 5)
    assert (kl_estimate(logp, logp.clone(), estimator) == 0).all()


def test_k3_nonnegative():
    logp, ref = 5 * torch.randn(1000), 5 * torch.randn(1000)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()  # k1 is unbiased only on average


def test_kl_estimators_match_true_kl_monte_carlo():
    # KL(q || p) for two categoricals, estimated from samples of q (the policy), as in Schulman's note.
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(6, generator=g), -1)
    p = torch.softmax(torch.randn(6, generator=g) * 0.5, -1)
    true_kl = (q * (q.log() - p.log())).sum()
    x = torch.multinomial(q, 200_000, replacement=True, generator=g)
    logq, logp = q.log()[x], p.log()[x]
    k1, k3 = kl_estimate(logq, logp, "k1"), kl_estimate(logq, logp, "k3")
    torch.testing.assert_close(k1.mean(), true_kl, rtol=0.03, atol=0)
    torch.testing.assert_close(k3.mean(), true_kl, rtol=0.03, atol=0)
    assert k3.std() < k1.std()  # why k3 is preferred when the two policies are close


def test_kl_penalized_rewards_score_on_eos_not_padding():
    # Row 0 emits EOS at index 2 and is padded after it; row 1 runs to the length limit without EOS.
    response = torch.tensor([[11, 12, EOS, 13, 14], [11, 12, 13, 14, 15]])
    ids, mask, ended = truncate_response(response, eos_token_id=EOS, pad_token_id=PAD)
    assert ids.tolist() == [[11, 12, EOS, PAD, PAD], [11, 12, 13, 14, 15]]
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    assert ended.tolist() == [True, False]

    score = eos_penalty(torch.tensor([2.0, 3.0]), ended, penalty=-1.0)
    assert score.tolist() == [2.0, -1.0]
    logprobs, ref_logprobs = torch.full((2, 5), -1.0), torch.full((2, 5), -1.5)  # k1 = 0.5 everywhere
    rewards, kl = kl_penalized_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1)
    expected = [[-0.05, -0.05, 2.0 - 0.05, 0.0, 0.0], [-0.05, -0.05, -0.05, -0.05, -1.0 - 0.05]]
    torch.testing.assert_close(rewards, torch.tensor(expected))
    assert (kl[~mask] == 0).all()


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)  # error 1.0, clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))


# ---------------------------------------------------------------------------------------------------------------------
# Losses and statistics
# ---------------------------------------------------------------------------------------------------------------------
def test_policy_loss_unclipped_inside_range():
    old = torch.randn(2, 6)
    logprobs = old + 0.05 * torch.randn(2, 6).clamp(-1, 1)  # ratio within [0.95, 1.06]
    advantages, mask = torch.randn(2, 6), torch.ones(2, 6)
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    torch.testing.assert_close(loss, (-(logprobs - old).exp() * advantages).mean())
    assert stats["clipfrac"] == 0
    assert stats["approx_kl"] == pytest.approx((0.5 * (logprobs - old) ** 2).mean().item())


def test_policy_loss_clipping_gradients_and_clipfrac():
    # Per token: (advantage, ratio). Clipping binds when the ratio has moved past the range in the advantage's
    # direction: then the loss is flat and the gradient 0. The last token is masked out.
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 3.0]])
    old = torch.zeros(1, 5)
    logprobs = ratios.log().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    loss.backward()
    grad = logprobs.grad[0]
    assert grad[0] == 0 and grad[1] == 0 and grad[4] == 0  # clipped (and masked)
    assert grad[2] != 0 and grad[3] != 0  # moved against the advantage: unclipped branch, still pushed back
    # loss = mean(max(-A r, -A clip(r))) = mean(-1.2, 0.8, -0.5, 1.5) = 0.15
    assert loss.item() == pytest.approx(0.15)
    assert stats["clipfrac"] == pytest.approx(0.5)


def test_value_loss_hand_worked():
    # clip 0.2, old value 0.5 for all:
    #   v=1.0, R=0.0: clipped v 0.7; errors (1.0, 0.49)  -> 1.0  (unclipped wins)
    #   v=0.0, R=0.4: clipped v 0.3; errors (0.16, 0.01) -> 0.16 (unclipped wins)
    #   v=0.0, R=-0.5: clipped v 0.3; errors (0.25, 0.64) -> 0.64 (clipped wins)
    # loss = 0.5 * (1.0 + 0.16 + 0.64) / 3 = 0.3; vf_clipfrac = 1/3
    values = torch.tensor([[1.0, 0.0, 0.0, 9.0]], requires_grad=True)
    old, returns = torch.full((1, 4), 0.5), torch.tensor([[0.0, 0.4, -0.5, 9.0]])
    loss, stats = value_loss(values, old, returns, torch.tensor([[1, 1, 1, 0]]), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad[0, 2] == 0 and values.grad[0, 3] == 0 and values.grad[0, 0] != 0


def test_masked_stats_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(3.5)
    assert masked_var(x, mask).item() == pytest.approx(torch.tensor([1.0, 2, 3, 4, 5, 6]).var().item())
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask.bool()] == 0).all()
    assert masked_mean(whiten(x, mask, shift_mean=False), mask).item() == pytest.approx(3.5)


def test_entropy_and_explained_variance():
    logits = torch.randn(3, 4, 7)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 7)), torch.full((2,), torch.tensor(7.0).log()))
    returns, mask = torch.randn(2, 5), torch.ones(2, 5)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(2, 5), returns, mask).item() == pytest.approx(0.0)  # a constant
    assert explained_variance(-returns, returns, mask).item() < 0


# ---------------------------------------------------------------------------------------------------------------------
# The invariants on a real model
# ---------------------------------------------------------------------------------------------------------------------
def left_padded_batch():
    """Two prompts of lengths 4 and 2, left-padded to 4 (the layout `generate` needs)."""
    input_ids = torch.tensor([[5, 6, 7, 8], [PAD, PAD, 9, 10]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    return input_ids, attention_mask


def sample(model, temperature: float, max_new_tokens: int = 8, eos_at: int | None = None):
    """Sample from the policy as a PPO rollout does; top_k=0/top_p=1.0 because generate() applies top_k=50 unless
    told not to, and then the sampling distribution is not softmax(logits / T). `eos_at` overwrites response token
    `eos_at` of row 0 with EOS (a random model rarely emits one), so that row has padding after its EOS."""
    input_ids, attention_mask = left_padded_batch()
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    prompt_len = input_ids.shape[1]
    response = out.sequences[:, prompt_len:].clone()
    if eos_at is not None:
        response[0, eos_at] = EOS
    response, response_mask, _ = truncate_response(response, EOS, PAD)
    sequences = torch.cat([input_ids, response], dim=1)  # (B, P + R)
    full_attention = torch.cat([attention_mask.bool(), response_mask], dim=1)  # (B, P + R)
    mask = torch.cat([torch.zeros_like(attention_mask, dtype=torch.bool), response_mask], dim=1)
    return sequences, full_attention, mask, out


def to_right_padded(sequences, attention_mask, mask):
    """The same rows with the padding moved to the end (prompt + response, then pads)."""
    right_ids, right_attn, right_mask = (
        torch.full_like(sequences, PAD),
        torch.zeros_like(attention_mask),
        torch.zeros_like(mask),
    )
    for row in range(sequences.shape[0]):
        keep = attention_mask[row]
        n = int(keep.sum())
        right_ids[row, :n], right_attn[row, :n], right_mask[row, :n] = sequences[row, keep], True, mask[row, keep]
    return right_ids, right_attn, right_mask


@pytest.mark.parametrize("build", [lambda: TinyForCausalLM(tiny_config()).eval(), tiny_llama], ids=["tiny", "llama"])
def test_generate_logprobs_equal_sequence_logprobs(build):
    model = build()
    temperature = 0.7
    sequences, attention_mask, mask, out = sample(model, temperature)
    with torch.no_grad():
        logprobs = sequence_logprobs(model, sequences, attention_mask, mask, temperature=temperature)
    prompt_len = sequences.shape[1] - len(out.scores)
    response = sequences[:, prompt_len:]
    # scores = processed logits (here logits / T); logits = raw logits. Both give the sampling distribution.
    from_scores = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    from_logits = (torch.stack(out.logits, 1) / temperature).log_softmax(-1).gather(-1, response[..., None])
    response_mask = mask[:, prompt_len:]
    torch.testing.assert_close(logprobs[:, prompt_len:][response_mask], from_scores[response_mask])
    torch.testing.assert_close(logprobs[:, prompt_len:][response_mask], from_logits.squeeze(-1)[response_mask])
    # At temperature 1 they differ: the temperature has to be applied in training too (Huang et al. detail).
    with torch.no_grad():
        at_one = sequence_logprobs(model, sequences, attention_mask, mask)
    assert not torch.allclose(at_one[mask], logprobs[mask])


@pytest.mark.parametrize(
    "build",
    [
        lambda: TinyForCausalLM(tiny_config()),
        lambda: TinyForCausalLM(tiny_config(position_embedding="learned")),
        tiny_llama,
    ],
    ids=["tiny-rope", "tiny-learned", "llama"],
)
def test_left_and_right_padding_agree(build):
    # The whole PPO computation, once on the left-padded rollout layout and once with the same rows right-padded:
    # row 0 stops at an EOS (padding after it), row 1 has the shorter prompt. RoPE is blind to a constant shift of
    # all positions; learned absolute positions are not, so that variant checks the position ids.
    model = ValueHeadModel(build()).eval()
    sequences, attention_mask, mask, _ = sample(model.policy, temperature=1.0, eos_at=3)
    assert not attention_mask[0, -1] and mask[0].sum() == 4
    right = to_right_padded(sequences, attention_mask, mask)
    scores = torch.tensor([0.5, -1.0])
    results = []
    for ids, attn, m in ((sequences, attention_mask, mask), right):
        with torch.no_grad():
            old = policy_forward(model, ids, attn, m)
            ref = sequence_logprobs(model, ids, attn, m) - 0.1 * m  # a stand-in reference policy
        rewards, _ = kl_penalized_rewards(scores, old.logprobs, ref, m, kl_coef=0.05, estimator="k3")
        advantages, returns = gae(rewards, old.values, m, gamma=1.0, lam=0.95)
        advantages = whiten(advantages, m)
        new = policy_forward(model, ids, attn, m)
        pg, _ = policy_loss(new.logprobs, old.logprobs + 0.1 * m, advantages, m)
        vf, _ = value_loss(new.values, old.values - 0.3 * m, returns, m)
        eos = (ids == EOS) & m
        assert eos.sum() == 1 and (rewards[eos] - scores[0]).abs() < 0.1  # the score sits on the EOS token ...
        assert (rewards[~m] == 0).all()  # ... and nothing on the padding after it
        per_token = [x[m] for x in (old.logprobs, old.values, old.entropy, rewards, advantages, returns)]
        results.append((per_token, pg, vf))
    (left_tokens, left_pg, left_vf), (right_tokens, right_pg, right_vf) = results
    for a, b in zip(left_tokens, right_tokens, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_pg, right_pg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(left_vf, right_vf, rtol=1e-5, atol=1e-6)


def test_ratio_is_one_and_kl_zero_before_any_update():
    model = tiny_policy()
    reference = copy.deepcopy(model.policy).eval()
    sequences, attention_mask, mask, _ = sample(model.policy, temperature=0.7)
    with torch.no_grad():
        old = sequence_logprobs(model, sequences, attention_mask, mask, temperature=0.7)
        ref = sequence_logprobs(reference, sequences, attention_mask, mask, temperature=0.7)
    new = policy_forward(model, sequences, attention_mask, mask, temperature=0.7)  # with grad, as in the update
    assert torch.equal(new.logprobs, old)  # ratio exactly 1, bit for bit
    for estimator in ("k1", "k3"):
        assert (kl_estimate(old, ref, estimator)[mask] == 0).all()
    loss, stats = policy_loss(new.logprobs, old, torch.randn_like(old), mask)
    assert stats["ratio"] == 1 and stats["clipfrac"] == 0 and stats["approx_kl"] == 0


def test_dropout_breaks_ratio_one_in_train_mode():
    # Why the rollout and the update must both run in eval mode (or both without dropout).
    model = ValueHeadModel(TinyForCausalLM(tiny_config(hidden_dropout=0.1)))
    sequences, attention_mask, mask, _ = sample(model.policy.eval(), temperature=1.0)
    model.train()
    with torch.no_grad():
        a = sequence_logprobs(model, sequences, attention_mask, mask)
        b = sequence_logprobs(model, sequences, attention_mask, mask)
    assert not torch.equal(a, b)


def test_position_ids_and_response_mask_from_start():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(attention_mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]
    assert response_mask_from_start(attention_mask, 3).long().tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------------------
# ValueHeadModel
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: TinyForCausalLM(tiny_config()), tiny_llama], ids=["tiny", "llama"])
def test_value_head_model_round_trip(build, tmp_path):
    model = ValueHeadModel(build()).eval()
    input_ids, attention_mask = left_padded_batch()
    logits, values = model(input_ids, attention_mask=attention_mask)
    assert logits.shape == (2, 4, 99) and values.shape == (2, 4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "value_head.safetensors").exists()
    reloaded = ValueHeadModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded.policy) is type(model.policy)
    logits2, values2 = reloaded(input_ids, attention_mask=attention_mask)
    assert torch.equal(logits, logits2) and torch.equal(values, values2)


def test_value_head_model_starts_from_a_plain_lm_folder(tmp_path):
    TinyForCausalLM(tiny_config()).save_pretrained(tmp_path)  # an SFT checkpoint: no value head yet
    model = ValueHeadModel.from_pretrained(tmp_path)
    assert model.value_head.weight.abs().max() < 1.0 and (model.value_head.bias == 0).all()


def test_value_head_model_with_peft_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    TinyForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    base = TinyForCausalLM.from_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model = ValueHeadModel(lora).eval()
    input_ids, attention_mask = left_padded_batch()
    logits, values = model(input_ids, attention_mask=attention_mask)
    model.save_pretrained(tmp_path / "ppo")
    assert (tmp_path / "ppo" / "adapter_config.json").exists()
    reloaded = ValueHeadModel.from_pretrained(tmp_path / "ppo").eval()
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)  # still trainable
    logits2, values2 = reloaded(input_ids, attention_mask=attention_mask)
    assert torch.equal(logits, logits2) and torch.equal(values, values2)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
def _x():
    return torch.zeros(2, 3)


BAD_CALLS = {
    "negative kl_coef": (lambda: kl_penalized_rewards(torch.zeros(2), _x(), _x(), torch.ones(2, 3), -0.1), "kl_coef"),
    "negative fixed kl": (lambda: FixedKLController(-1.0), "kl_coef"),
    "adaptive target 0": (lambda: AdaptiveKLController(0.1, target=0.0, horizon=10), "target"),
    "clip_range 0": (lambda: policy_loss(_x(), _x(), _x(), torch.ones(2, 3), clip_range=0.0), "clip_range"),
    "clip_range_value<0": (lambda: value_loss(_x(), _x(), _x(), torch.ones(2, 3), clip_range_value=-1), "clip_range"),
    "gamma > 1": (lambda: gae(_x(), _x(), torch.ones(2, 3), gamma=1.1, lam=0.9), "gamma"),
    "lam < 0": (lambda: gae(_x(), _x(), torch.ones(2, 3), gamma=1.0, lam=-0.1), "lam"),
    "pad == eos": (lambda: truncate_response(torch.zeros(2, 3, dtype=torch.long), 5, 5), "pad_token_id"),
    "empty response": (lambda: gae(_x(), _x(), torch.tensor([[1, 1, 0], [0, 0, 0]])), r"rows \[1\]"),
    "empty rewards": (lambda: kl_penalized_rewards(torch.zeros(2), _x(), _x(), torch.zeros(2, 3), 0.1), "empty"),
    "bad estimator": (lambda: kl_estimate(_x(), _x(), "k4"), "k4"),
    "mask shape": (lambda: policy_loss(_x(), _x(), _x(), torch.ones(3, 2)), "shape"),
    "temperature 0": (
        lambda: policy_forward(None, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), 1, temperature=0.0),
        "temperature",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises(name):
    call, match = BAD_CALLS[name]
    with pytest.raises(ValueError, match=match):
        call()
