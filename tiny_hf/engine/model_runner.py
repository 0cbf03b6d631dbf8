"""The model runner: one forward of the model over cache rows, eager for prefill, and for decoding with fixed shapes
that can be compiled (torch.compile) or replayed (CUDA graphs).

Why fixed shapes: a decode step of a small model is ~100 small kernels, and on a GPU the Python and launch overhead
between them, not the arithmetic, limits batch-1 speed. Padding the batch to a power of two and attending over the
whole window (the mask hides what is not written) gives each step the same shapes, so one CUDA graph per padded size
replays the step without Python, and inductor's C++ wrapper does the same on a CPU. The layer loop is the model's
own `TinyModel.forward`, given the runner's cache and attention bias.
"""

from __future__ import annotations

import torch

from ..modeling_tiny import attention_bias


class ModelRunner:
    """Runs a `TinyForCausalLM` on a `SlotKVCache`.

    Args:
        model: The causal LM, in eval mode.
        cache: The slot cache its forwards read and write.
        cuda_graphs: Replay each decode step as a CUDA graph.
        static_decode: Decode with the fixed shapes CUDA graphs need, without capturing them.
        compile: Compile the static decode step with torch.compile (needs static_decode).
        decode_steps: Greedy steps per `decode_greedy` call.
    """

    def __init__(self, model, cache, *, cuda_graphs: bool, static_decode: bool, compile: bool, decode_steps: int = 1):
        self.model, self.cache = model, cache
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.sliding_window = getattr(model.config, "sliding_window", None)
        self.slopes = getattr(model.model, "alibi_slopes", None)
        self.dynamic_rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None) == "dynamic"
        self.cuda_graphs, self.static_decode = cuda_graphs, static_decode
        self.decode_steps = decode_steps
        self._graphs: dict[tuple, tuple] = {}  # (step, padded batch size) -> (graph, ids, positions, output)
        if compile:
            # dynamic=False: one graph per padded batch size, the shapes the static step already fixes; on a CPU the
            # C++ wrapper runs a whole step without returning to Python between kernels.
            options = {"cpp_wrapper": True} if self.device.type != "cuda" else None
            self._static_forward = torch.compile(self._static_forward, dynamic=False, options=options)
            self._static_greedy = torch.compile(self._static_greedy, dynamic=False, options=options)

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The model's final hidden states (B, Q, hidden) through its own forward, with our cache and bias."""
        out = self.model.model(
            input_ids=input_ids, position_ids=positions, cache=self.cache, attention_bias=bias, use_cache=True
        )
        return out.last_hidden_state

    def forward(
        self,
        rows: slice | torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model on cache rows `rows` (a slice or slot indices) for input_ids/positions (B, Q), where position
        -1 marks a padding query; returns fp32 logits (B, V) of each row's query `last_index` (B,) (default: the last).

        A padding query sees no key, and its key goes to the window's last entry, marked empty: outside the ring no
        sequence ever uses that entry (a prompt ends before it and decoding stops before it)."""
        if self.dynamic_rope and input_ids.shape[0] > 1:
            # Dynamic NTK scales by the longest position of a call: one row per call, as each sequence alone gets.
            if isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop, device=self.device)
            last = [None] * len(rows) if last_index is None else last_index[:, None]
            return torch.cat(
                [
                    self.forward(rows[i : i + 1], input_ids[i : i + 1], positions[i : i + 1], last[i])
                    for i in range(len(rows))
                ]
            )
        hidden = self.hidden_states(rows, input_ids, positions)
        if last_index is None:
            hidden = hidden[:, -1]  # (B, hidden)
        else:
            hidden = hidden[torch.arange(hidden.shape[0], device=self.device), last_index]  # (B, hidden)
        return self.model.lm_head(hidden).float()  # (B, V)

    def hidden_states(
        self, rows: slice | torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The final hidden states (B, Q, hidden) of input_ids/positions (B, Q) on cache rows `rows`: what `forward`
        reads its logits from, and speculative decoding reads every query's."""
        cache = self.cache
        write_index = positions % cache.max_len  # the ring wraps; -1 (padding) lands on the last entry
        kv_len = min(int(positions.max()) + 1, cache.max_len)
        cache.bind(rows, write_index, positions, kv_len)
        bias = attention_bias(
            positions,
            cache.positions[rows, :kv_len],
            sliding_window=self.sliding_window,
            slopes=self.slopes,
            dtype=self.dtype,
        )
        return self._hidden(input_ids, positions.clamp(min=0), bias)  # padding queries embed as position 0

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one decode step of the rows [0, B) for ids/positions (B, 1)."""
        if not self.static_decode:
            return self.forward(slice(0, ids.shape[0]), ids, positions)
        return self._padded(self._static_forward, ids, positions)

    def decode_greedy(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`decode_steps` greedy decode steps of the rows [0, B) in one call (vLLM's multi-step scheduling: the
        engine's Python runs once per `decode_steps` tokens); returns the tokens (B, decode_steps)."""
        if not self.static_decode:
            rows = slice(0, ids.shape[0])
            return self._greedy_steps(lambda i, p: self.forward(rows, i, p), ids, positions)
        return self._padded(self._static_greedy, ids, positions)

    def _greedy_steps(self, step, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed each step's argmax to the next: `step(ids, positions)` gives the logits (B, V) of one step."""
        tokens = []
        for _ in range(self.decode_steps):
            ids = step(ids, positions).argmax(-1, keepdim=True)  # (B, 1)
            positions = torch.where(positions >= 0, positions + 1, positions)  # padding rows stay padding
            tokens.append(ids)
        return torch.cat(tokens, dim=1)  # (B, steps)

    def _padded(self, step, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run a static step on the batch padded to the next power of two (padding rows: position -1), replaying its
        CUDA graph when graphs are on; returns the live rows of its output."""
        n = ids.shape[0]
        size = min(1 << (n - 1).bit_length(), self.cache.seen.shape[0])
        pad_ids = torch.zeros(size, 1, dtype=torch.long, device=self.device)
        pad_positions = torch.full((size, 1), -1, dtype=torch.long, device=self.device)
        pad_ids[:n], pad_positions[:n] = ids, positions
        if not self.cuda_graphs:
            return step(pad_ids, pad_positions)[:n]
        key = (step.__name__, size)
        if key not in self._graphs:
            self._graphs[key] = self._capture(step, pad_ids, pad_positions)
        graph, static_ids, static_positions, static_out = self._graphs[key]
        static_ids.copy_(pad_ids)
        static_positions.copy_(pad_positions)
        graph.replay()
        return static_out[:n].clone()

    def _static_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._static_logits(ids, positions)

    def _static_greedy(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._greedy_steps(self._static_logits, ids, positions)

    def _static_logits(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decode logits (B, V) of the rows [0, B) for ids/positions (B, 1), where -1 marks a padding row, attending
        over the whole window; tensor ops only. Padding rows write their (ignored) key to the window's last entry,
        which no live sequence still needs: a sequence stops before it would attend to that entry."""
        cache = self.cache
        write_index = torch.where(positions >= 0, positions, cache.max_len - 1)
        cache.bind(slice(0, ids.shape[0]), write_index, positions, cache.max_len)
        bias = attention_bias(
            positions,
            cache.positions[: ids.shape[0]],
            sliding_window=self.sliding_window,
            slopes=self.slopes,
            dtype=self.dtype,
        )  # (B, 1 or H, 1, max_len)
        hidden = self._hidden(ids, positions.clamp(min=0), bias)
        return self.model.lm_head(hidden).float()[:, -1]

    def _capture(self, step, ids: torch.Tensor, positions: torch.Tensor) -> tuple:
        """Record a static step for this padded batch size as a CUDA graph (warm up on a side stream first, as
        torch.cuda.graphs requires); replays then reuse its input and output buffers."""
        static_ids, static_positions = ids.clone(), positions.clone()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(static_ids, static_positions)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_ids, static_positions)
        return graph, static_ids, static_positions, static_out
