"""The engine's settings, checked against the model before anything is allocated, so a setting that cannot work is
one clear error at construction, never a failure in the middle of serving."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

from .scheduler import WINDOW_POLICIES

ENGINE_MODULES = ("embed_tokens", "add_positions", "layers", "norm")  # what the engine needs on model.model


def supports(model) -> bool:
    """Whether the engine can run `model`: a TinyForCausalLM whose forward takes the engine's attention bias."""
    inner = getattr(model, "model", None)
    return (
        all(hasattr(inner, name) for name in ENGINE_MODULES)
        and hasattr(model, "lm_head")
        and "attention_bias" in inspect.signature(inner.forward).parameters
    )


@dataclass
class EngineConfig:
    """How the engine runs a model (the `Engine` arguments of the same names; see there)."""

    max_batch_size: int = 16
    max_seq_len: int | None = None
    token_budget: int = 512
    max_queue: int = 256
    prefix_cache_tokens: int = 4096
    window_policy: str = "reject"
    cuda_graphs: bool | None = None
    static_decode: bool = False
    compile: bool = False
    decode_steps: int = 1

    def resolve(self, model) -> EngineConfig:
        """These settings for `model`: the window filled in and the decode mode settled; a ValueError (TypeError for
        a model the engine cannot run) names the setting that cannot work."""
        if not supports(model):
            raise TypeError(
                f"the engine runs TinyForCausalLM models; {type(model).__name__} is not one (or comes from an older "
                "exported folder): use model.generate() for this one"
            )
        config = model.config
        if self.window_policy not in WINDOW_POLICIES:
            raise ValueError(f"window_policy={self.window_policy!r} is not one of {list(WINDOW_POLICIES)}")
        max_seq_len = self.max_seq_len or config.max_position_embeddings
        self._check_window(config, max_seq_len)
        for name in ("max_batch_size", "token_budget", "max_queue", "decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 1")
        return dataclasses.replace(self, max_seq_len=max_seq_len, **self._decode_mode(model))

    def _check_window(self, config, max_seq_len: int) -> None:
        sliding_window = getattr(config, "sliding_window", None)
        absolute = config.position_embedding in ("learned", "sinusoidal")
        if self.window_policy == "sliding":
            if not sliding_window:
                raise ValueError("window_policy='sliding' needs a model configured with a sliding_window")
            if absolute:
                raise ValueError("window_policy='sliding' needs relative positions (rope, alibi or none)")
            if max_seq_len < sliding_window + 16:
                raise ValueError(f"max_seq_len={max_seq_len} must exceed sliding_window={sliding_window} by >= 16")
        if absolute and max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len={max_seq_len} is beyond the {config.position_embedding!r} position table "
                f"({config.max_position_embeddings} positions)"
            )

    def _decode_mode(self, model) -> dict:
        """Eager, static (fixed shapes), CUDA-graphed or compiled decoding, as the device and model allow: not the
        static step for the sliding ring or dynamic NTK RoPE, whose shapes or tables change from step to step."""
        rotary = getattr(model.model, "rotary_emb", None)
        static_ok = not (self.window_policy == "sliding" or getattr(rotary, "rope_type", None) == "dynamic")
        graphs_ok = model.lm_head.weight.device.type == "cuda" and static_ok
        cuda_graphs = graphs_ok if self.cuda_graphs is None else self.cuda_graphs
        if cuda_graphs and not graphs_ok:
            raise ValueError(
                "cuda_graphs=True needs the model on a CUDA device, and neither the sliding policy nor dynamic RoPE"
            )
        if self.compile and not static_ok:
            raise ValueError(
                "compile=True needs the static decode step, which the sliding policy and dynamic RoPE cannot use"
            )
        return dict(
            cuda_graphs=cuda_graphs, static_decode=(self.static_decode or cuda_graphs or self.compile) and static_ok
        )
