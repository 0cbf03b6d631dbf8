"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap draft model proposes k tokens one by one,
the target scores all of them in one forward, and the longest run it agrees with is kept, plus the target's own next
token. Greedy output is exactly the target's, at the cost of one target forward per 1 to k + 1 tokens.

Why it pays: a decode step of the target is bound by reading its weights (or by per-step overhead), and scoring
k + 1 tokens reads them once, so each accepted draft token is nearly free. `layer_skip_draft` makes a draft of the
target's own first layers (self-speculative decoding, Zhang et al. 2023), which needs no second model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .kv_cache import SlotKVCache
from .model_runner import ModelRunner


def layer_skip_draft(model, num_layers: int):
    """A draft that runs the first `num_layers` blocks of `model` and then its final norm and head, sharing every
    weight with it (a shallow copy with fewer layers)."""
    total = model.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"num_layers={num_layers} must be in [1, {total - 1}] for a {total}-layer model")
    config = model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": num_layers})
    draft = model.__class__(config).to(device=model.device, dtype=model.dtype)
    draft.model.layers = nn.ModuleList(model.model.layers[:num_layers])
    for name in ("embed_tokens", "norm", "rotary_emb"):
        setattr(draft.model, name, getattr(model.model, name))
    draft.lm_head = model.lm_head
    return draft.eval()


class SpeculativeDecoder:
    """Greedy generation of one sequence at a time with a draft and a target model (each a TinyForCausalLM or a
    Llama-family model) that share a vocabulary.

    Args:
        target: The model whose output is produced.
        draft: The model that proposes tokens.
        num_speculative_tokens: k, the tokens proposed per round (>= 1).
        max_seq_len: Context window (prompt + output); defaults to the target's `max_position_embeddings`.
    """

    def __init__(self, target, draft, *, num_speculative_tokens: int = 4, max_seq_len: int | None = None):
        from ..convert import engine_ready  # convert -> chat -> engine: imported here, not at the top

        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens!r} must be an integer >= 1")
        target, draft = engine_ready(target).eval(), engine_ready(draft).eval()
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                f"({target.config.vocab_size}): speculative decoding needs the same tokenizer for both"
            )
        self.k = num_speculative_tokens
        self.max_seq_len = max_seq_len or target.config.max_position_embeddings
        self.target, self.draft = self._runner(target), self._runner(draft)
        self.proposed = self.accepted = self.target_forwards = self.generated = 0  # totals over every call

    def _runner(self, model) -> ModelRunner:
        config = model.config
        cache = SlotKVCache(
            num_layers=config.num_hidden_layers,
            num_slots=1,
            num_kv_heads=config.num_key_value_heads,
            max_len=self.max_seq_len,
            head_dim=config.head_dim,
            vocab_size=config.vocab_size,
            dtype=model.lm_head.weight.dtype,
            device=model.lm_head.weight.device,
        )
        return ModelRunner(model, cache, cuda_graphs=False, static_decode=False, compile=False)

    @property
    def acceptance_rate(self) -> float:
        """The share of proposed draft tokens the target agreed with, over every call so far."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def _logits(self, runner: ModelRunner, ids: Sequence[int], start: int) -> torch.Tensor:
        """Logits (len(ids), V) of `ids` placed at positions start, start + 1, ... of the runner's one slot."""
        device = runner.device
        positions = torch.arange(start, start + len(ids), device=device)[None]  # (1, Q)
        hidden = runner.hidden_states(slice(0, 1), torch.tensor([list(ids)], device=device), positions)
        return runner.model.lm_head(hidden[0]).float()  # (Q, V)

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_tokens: int, stop_token_ids: Sequence[int] = ()) -> list[int]:
        """The target's greedy continuation of `prompt_ids`: `max_tokens` tokens, or up to the first stop id."""
        seq = [int(t) for t in prompt_ids]
        if not seq or len(seq) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"the prompt ({len(seq)} tokens) must be non-empty and leave room for max_tokens={max_tokens} in "
                f"the {self.max_seq_len}-token window"
            )
        for runner in (self.target, self.draft):
            runner.cache.reset_slot(0, [])
        if len(seq) > 1:
            self._logits(self.target, seq[:-1], 0)  # the target's cache holds every token but the last
        drafted, output = 0, []  # drafted: tokens whose keys are in the draft's cache
        while len(output) < max_tokens:
            k = min(self.k, max_tokens - len(output) - 1)  # the last round may have room for fewer
            proposal = self._propose(seq, drafted, k)
            scores = self._logits(self.target, [seq[-1], *proposal], len(seq) - 1).argmax(-1).tolist()  # (k + 1,)
            agreed = next((i for i, (d, t) in enumerate(zip(proposal, scores, strict=False)) if d != t), len(proposal))
            new = [*proposal[:agreed], scores[agreed]]
            self.proposed, self.accepted, self.target_forwards = (
                self.proposed + len(proposal),
                self.accepted + agreed,
                self.target_forwards + 1,
            )
            if proposal:  # the draft's cache now also holds the accepted proposals it was fed (all but the k-th)
                drafted = len(seq) + min(agreed, k - 1)
            seq += new
            output += new
            self.generated += len(new)
            stop = next((i for i, t in enumerate(output) if t in stop_token_ids), None)
            if stop is not None:
                return output[: stop + 1]
        return output[:max_tokens]

    def _propose(self, seq: list[int], drafted: int, k: int) -> list[int]:
        """k greedy draft tokens after `seq`; the draft first catches up on the tokens its cache lacks."""
        if k == 0:
            return []
        token = int(self._logits(self.draft, seq[drafted:], drafted)[-1].argmax())
        proposal = [token]
        for i in range(1, k):
            token = int(self._logits(self.draft, [token], len(seq) + i - 1)[-1].argmax())
            proposal.append(token)
        return proposal
