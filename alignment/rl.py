"""The shared core of policy-gradient RLHF (PPO now, GRPO later): a value head, per-token log-probs, KL penalties,
advantage estimation and the clipped losses, each a small function over (B, T) tensors.

PPO for language models (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Stiennon et al.
2020; Ouyang et al. 2022, "Training language models to follow instructions with human feedback", InstructGPT) is an
episode per prompt: the policy samples a response, a reward model scores the whole response once, and each response
token is one action. What the training loop needs from this file:

    rollout (no grad)   sequence_logprobs / policy_forward on policy and reference -> logprobs, ref_logprobs, values
    rewards             eos_penalty(score), then kl_penalized_rewards: -kl_coef * KL on every response token, the
                        score on the last real response token (Ouyang et al. eq. 2: R(x, y) - beta log pi / pi_ref)
    advantages          gae over the response tokens (Schulman et al. 2016), whiten(advantages)
    update (grad)       policy_forward again -> policy_loss (clipped surrogate, Schulman et al. 2017) + value_loss
    controller          AdaptiveKLController (Ziegler et al. 2019) or FixedKLController for kl_coef

Layout: every per-token tensor is (B, T) and aligned with `input_ids` (prompt + response + padding): entry t belongs
to token t, i.e. logprobs[:, t] = log pi(x_t | x_<t) and values[:, t] = V(x_<t), the value of the state in which
token t was chosen. A `mask` (B, T) marks the response tokens that count (not the prompt, not the padding after EOS),
so left-padded prompts (one common response start) and right-padded ones (a start per row) give the same numbers.
Outside the mask every returned tensor is 0.

The details follow Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization": logits divided by the sampling temperature also when training, score on the EOS token and a
fixed penalty for responses without EOS, position ids from the attention mask for padded batches, advantage
whitening over the batch, token-level value clipping, KL estimators from Schulman's note "Approximating KL
Divergence" (2020, k1/k2/k3).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

VALUE_HEAD_FILE = "value_head.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# Checks. Every public function validates its hyperparameters and masks: a wrong sign or an empty response otherwise
# trains silently on nonsense.
# ---------------------------------------------------------------------------------------------------------------------
def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1]")


def _check_kl_coef(kl_coef: float) -> None:
    if not kl_coef >= 0:
        raise ValueError(
            f"kl_coef={kl_coef!r} must be >= 0 (a negative coefficient rewards drifting from the reference)"
        )


def _check_mask(mask: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
    """Return `mask` as bool after checking its shape and that every row has at least one response token."""
    if shape is not None and mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    mask = mask.bool()
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty response (mask all zeros) in rows {empty}: every row needs at least one token")
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics. Means are over all unmasked tokens of the batch (token-level, as Huang et al. do), not per row.
# ---------------------------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is true (over `dim`, or everything). Uses `where`, not `x * mask`,
    so NaN/inf in masked-out entries (e.g. logits of fully masked left padding) cannot leak in."""
    mask = mask.bool()
    if not mask.any():
        raise ValueError("masked_mean over an all-zero mask")
    x = torch.where(mask, x, torch.zeros_like(x))
    if dim is None:
        return x.sum() / mask.sum()
    return x.sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the unmasked entries; `unbiased` applies Bessel's correction (n / (n - 1)), as TRL and
    Huang et al. do for advantage whitening."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum()
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 unmasked entries, got {int(n)}")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over the unmasked entries; 0 outside the mask.
    PPO whitens advantages per batch; `shift_mean=False` keeps their sign, as done for rewards."""
    mask = mask.bool()
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the unmasked tokens: 1 is a perfect critic, 0 is no better than
    a constant, negative is worse. The standard health check of a PPO value function."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution over the last dimension: (..., V) -> (...). Computed as
    logsumexp(z) - sum(softmax(z) * z), stable for large logits."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Policy with a value head.
# ---------------------------------------------------------------------------------------------------------------------
class ValueHeadOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    values: torch.Tensor  # (B, T): values[:, t] = V(x_<=t), the value after reading token t


class ValueHeadModel(nn.Module):
    """A causal LM plus a scalar value head (Linear hidden -> 1) on its last hidden state: PPO's actor and critic in
    one network, sharing the trunk (TRL's old `AutoModelForCausalLMWithValueHead`, removed in TRL 1.x).

    Args:
        policy: any causal LM that returns `hidden_states` (TinyForCausalLM, a stock transformers model, or a PEFT
            model wrapping one).
        value_head_std: init std of the head's weight (bias 0); default 1 / sqrt(hidden + 1), as Huang et al.'s
            scalar heads: small, so the first values are near 0 and do not swamp the early value loss.
    """

    def __init__(self, policy: nn.Module, value_head_std: float | None = None):
        super().__init__()
        self.policy = policy
        hidden_size = policy.config.hidden_size
        self.value_head = nn.Linear(hidden_size, 1)
        std = value_head_std if value_head_std is not None else 1.0 / (hidden_size + 1) ** 0.5
        nn.init.normal_(self.value_head.weight, std=std)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.policy.config

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> ValueHeadOutput:
        """Logits (B, T, V) and values (B, T). Without `position_ids`, they are derived from `attention_mask`, so a
        padded row gives the numbers of the unpadded one."""
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            **kwargs,
        )
        hidden = out.hidden_states[-1]  # (B, T, hidden): after the final norm, what lm_head reads
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, T, 1) -> (B, T)
        return ValueHeadOutput(logits=out.logits, values=values)

    def generate(self, *args, **kwargs):
        """Sampling is the policy's alone: the value head plays no part in it."""
        return self.policy.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The policy through its own `save_pretrained` (a full model, or only the adapter for PEFT) and the head as
        `value_head.safetensors` next to it."""
        save_directory = Path(save_directory)
        self.policy.save_pretrained(save_directory, **kwargs)
        state = {f"value_head.{k}": v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(state, save_directory / VALUE_HEAD_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> ValueHeadModel:
        """Reload a saved ValueHeadModel; `kwargs` go to the policy's `from_pretrained` (e.g. `dtype=torch.float32`).
        A folder with `adapter_config.json` loads its base model, then the adapter, trainable (PEFT's default is
        frozen). A folder without the head file (an SFT model) gets a freshly initialised head: that is how PPO
        starts."""
        path = Path(path)
        if (path / "adapter_config.json").exists():
            from peft import PeftConfig, PeftModel  # optional dependency, only for adapter folders

            base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
            policy = PeftModel.from_pretrained(base, path, is_trainable=True)
        else:
            policy = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model = cls(policy)
        head_file = path / VALUE_HEAD_FILE
        if head_file.exists():
            state = load_file(head_file)
            model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in state.items()})
        return model


# ---------------------------------------------------------------------------------------------------------------------
# Per-token log-probs of a response.
# ---------------------------------------------------------------------------------------------------------------------
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions counted over real tokens only: cumsum(mask) - 1, clamped at 0 for left padding (what `generate`
    does). A left-padded row then sees the same positions as the same row unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def response_mask_from_start(attention_mask: torch.Tensor, response_start: int) -> torch.Tensor:
    """The response mask for the usual rollout layout: left-padded prompts of common width `response_start`, then the
    generated tokens; the attention mask removes the padding after EOS."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return attention_mask.bool() & (positions >= response_start)  # (B, T)


def shift_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Move per-position outputs onto the token they predict: out[:, t] = x[:, t - 1], out[:, 0] = 0. Logits and
    values at position t - 1 are computed before token t is seen, so they belong to the choice of token t."""
    return F.pad(x[:, :-1], (0, 0, 1, 0) if x.dim() == 3 else (1, 0))  # (B, T, ...) with a zero first step


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.LongTensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for each position: (..., V), (...) -> (...). In float32: bf16
    log-probs are too coarse for the ratio exp(logp - logp_old)."""
    _check_positive("temperature", temperature)
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class PolicyOutput(NamedTuple):
    logprobs: torch.Tensor  # (B, T) log pi(x_t | x_<t) on response tokens, 0 elsewhere
    values: torch.Tensor | None  # (B, T) V(x_<t) on response tokens, 0 elsewhere; None for a model without a head
    entropy: torch.Tensor  # (B, T) entropy of pi(. | x_<t) on response tokens, 0 elsewhere


def policy_forward(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor | int,
    *,
    temperature: float = 1.0,
) -> PolicyOutput:
    """One forward pass giving what a PPO step needs per response token: log-probs, values (for a ValueHeadModel)
    and entropies, all aligned with `input_ids`. `response_mask` is a (B, T) mask or the common response start of a
    left-padded batch. Logits are divided by the sampling `temperature`, or the ratio compares different policies."""
    _check_positive("temperature", temperature)
    if isinstance(response_mask, int):
        response_mask = response_mask_from_start(attention_mask, response_mask)
    mask = _check_mask(response_mask, input_ids.shape)
    if mask[:, 0].any():
        raise ValueError("response_mask marks token 0: a response token needs at least one token before it")
    position_ids = position_ids_from_mask(attention_mask)
    if isinstance(model, ValueHeadModel):
        logits, values = model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        values = torch.where(mask, shift_to_tokens(values), 0.0)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        values = None
    logits = shift_to_tokens(logits.float()) / temperature  # (B, T, V): logits[:, t] now predict token t
    logprobs = logprobs_from_logits(logits, input_ids)
    entropy = entropy_from_logits(logits)
    zero = torch.zeros((), device=logprobs.device)
    return PolicyOutput(torch.where(mask, logprobs, zero), values, torch.where(mask, entropy, zero))


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor | int,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs (B, T) of the response tokens under `model` at `temperature`; 0 on prompt and padding.
    Position ids come from `attention_mask`, so left- and right-padded batches give the same numbers."""
    return policy_forward(model, input_ids, attention_mask, response_mask, temperature=temperature).logprobs


def truncate_response(
    response_ids: torch.LongTensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor]:
    """Cut generated responses (B, R) after their first EOS: returns (ids with pad after EOS, mask (B, R) of the
    tokens up to and including EOS, ended (B,) whether EOS was emitted). Needs pad != eos: otherwise every later
    `ids != pad` (attention masks, a reward model's last-token lookup) silently drops the EOS token."""
    if pad_token_id == eos_token_id:
        raise ValueError(
            f"pad_token_id == eos_token_id ({pad_token_id}): padding cannot be told from EOS; use a separate pad token"
        )
    is_eos = response_ids == eos_token_id  # (B, R)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = ~after_eos
    return response_ids.masked_fill(after_eos, pad_token_id), mask, is_eos.any(-1)


def eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float = -1.0) -> torch.Tensor:
    """Replace the score of responses that never emitted EOS (truncated at the length limit) by a fixed `penalty`
    (Huang et al. 2024): otherwise the policy learns to ramble up to the limit whenever the reward model likes it."""
    return torch.where(ended.bool(), scores, torch.as_tensor(penalty, dtype=scores.dtype, device=scores.device))


# ---------------------------------------------------------------------------------------------------------------------
# KL to the reference policy. With r = pi_ref / pi and samples from pi, all three estimate KL(pi || pi_ref)
# (Schulman 2020): k1 is unbiased but can be negative per token, k3 is unbiased and >= 0, k2 is biased, >= 0, low
# variance (and is PPO's "approx_kl" statistic).
# ---------------------------------------------------------------------------------------------------------------------
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref = -log r, per token."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (log r)^2, per token."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, per token; expm1 keeps it exact near r = 1."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate by name (one of KL_ESTIMATORS)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def last_token_index(mask: torch.Tensor) -> torch.LongTensor:
    """Index (B,) of the last true entry of each row of `mask` (B, T): the EOS, or the last token of a truncated
    response; padding after it is never picked."""
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    return (mask.long() * positions).argmax(-1)


def kl_penalized_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): -kl_coef * KL on every response token plus the scalar `score` (B,) on the last
    response token (Ouyang et al. 2022, eq. 2). Returns (rewards, kl); both 0 outside `mask`."""
    _check_kl_coef(kl_coef)
    mask = _check_mask(mask, logprobs.shape)
    kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, estimator), 0.0)
    rewards = -kl_coef * kl
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += score.to(rewards.dtype)
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient (beta in Ouyang et al. 2022)."""

    def __init__(self, kl_coef: float):
        _check_kl_coef(kl_coef)
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: steer beta so the observed KL tracks `target`. Each update multiplies beta by
    1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon (a proportional controller, log-space).

    Args:
        init_kl_coef: starting beta.
        target: the KL (nats per sequence, as logged) to aim for.
        horizon: how many samples (episodes) the correction is spread over; larger is slower.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        _check_kl_coef(init_kl_coef)
        _check_positive("target", target)
        _check_positive("horizon", horizon)
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------------------------
# Advantages and losses.
# ---------------------------------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the response tokens only: (advantages, returns),
    each (B, T) and 0 outside `mask`. delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, where
    t + 1 is the next *unmasked* token; after the last one the episode ends (V = 0, no bootstrap)."""
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    mask = _check_mask(mask, rewards.shape)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        m = mask[:, t]
        # Masked steps are skipped: they carry the next token's value and advantage through unchanged.
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss: mean over response tokens of
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logp - logp_old). Stats: `clipfrac` (tokens where the clipped
    branch wins, i.e. the gradient is 0), `approx_kl` (mean 0.5 (log r)^2), `ratio` (mean r)."""
    _check_positive("clip_range", clip_range)
    mask = _check_mask(mask, logprobs.shape)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Huang et al.): 0.5 * mean max((V - R)^2,
    (V_old + clip(V - V_old, -eps, eps) - R)^2) over response tokens. Stats: `vf_clipfrac`, `vf_explained_var`."""
    _check_positive("clip_range_value", clip_range_value)
    mask = _check_mask(mask, values.shape)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
        if mask.sum() >= 2:
            stats["vf_explained_var"] = explained_variance(values, returns, mask)
    return loss, stats
