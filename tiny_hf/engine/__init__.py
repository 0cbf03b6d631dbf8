"""A from-scratch inference engine: slot KV cache, continuous batching, chunked prefill, prefix caching, sampling,
streaming, compiled and CUDA-graphed decoding, speculative decoding.

`model.generate()` is correct but spends most of each step in Python and runs one batch from start to end. This
package is how serving systems (Orca; vLLM, Kwon et al. 2023) work instead, in the shape of nano-vllm, a file per
part, each small enough to read in one sitting:

- sequence.py: a request and what comes back; sampling.py: the parameters and the sampler.
- kv_cache.py: the preallocated slot cache and the prefix cache.
- scheduler.py: admission, chunked prefill, continuous batching, the context-window policies.
- model_runner.py: the model's own forward over the cache; fixed-shape decode steps, compiled or CUDA-graphed.
- detokenize.py: incremental detokenization and stop strings; config.py: the settings, checked against the model;
  engine.py: the step; loop.py: the serving thread.
- speculative.py: a draft model proposes tokens, the target checks them in one forward.

    engine = Engine.from_pretrained("runs/demo/model")
    print(engine.generate(["The json module"], SamplingParams(max_tokens=20, temperature=0))[0].text)
    for delta in engine.stream("A dictionary is", SamplingParams(max_tokens=20)):
        print(delta.text, end="", flush=True)

docs/09-serving.md explains the design in more depth.
"""

from .config import EngineConfig
from .engine import Engine
from .kv_cache import PREFIX_BLOCK, PrefixCache, SlotKVCache
from .loop import EngineLoop
from .sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample, sample_tokens
from .scheduler import WINDOW_POLICIES, fit_messages
from .sequence import FINISH_REASONS, Completion, ContextWindowError, QueueFullError, RequestOutput
from .speculative import SpeculativeDecoder, layer_skip_draft

__all__ = [
    "FINISH_REASONS",
    "PREFIX_BLOCK",
    "WINDOW_POLICIES",
    "Completion",
    "ContextWindowError",
    "Engine",
    "EngineConfig",
    "EngineLoop",
    "PrefixCache",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "SlotKVCache",
    "SpeculativeDecoder",
    "apply_repetition_penalty",
    "filter_logits",
    "fit_messages",
    "layer_skip_draft",
    "sample",
    "sample_tokens",
]
