"""Where the engine keeps keys and values: one preallocated slot per running sequence, and a prefix cache of blocks.

Why slots: a slot of `max_len` keys/values per sequence, written in place, makes a decode step cost one token of
compute and no allocation, and lets every running sequence decode in one batched forward (Orca, Yu et al. 2022).
Why blocks for the prefix cache: prompts that start alike (a system prompt, a chat history) share whole 16-token
blocks, keyed by the hash of the block and everything before it (vLLM's automatic prefix caching).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

PREFIX_BLOCK = 16  # tokens per prefix-cache block


class SlotKVCache:
    """Keys and values of up to `num_slots` sequences, (slots, kv_heads, max_len, head_dim) per layer, plus what each
    entry holds and which tokens each slot has seen (for the repetition penalty).

    The runner `bind`s it before each forward (which rows, where the new tokens go, how many keys to return), and
    every attention layer then calls `update(k, v, layer_idx)`: the new keys/values are written in place and the
    rows' first `kv_len` entries come back (a view when the rows are a slice, as for the decoding rows [0, n); a copy
    when they are a list of slots). `positions` records the position each entry holds (-1: empty), which is what the
    attention mask is built from, so a ring buffer (sliding window) needs no special case.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        vocab_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.positions = torch.full((num_slots, max_len), -1, dtype=torch.long, device=device)
        self.seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        self.max_len = max_len
        self._rows, self._batch_index, self._write_index, self._kv_len = slice(0, 0), None, None, 0

    def bind(
        self, rows: slice | torch.Tensor, write_index: torch.Tensor, write_positions: torch.Tensor, kv_len: int
    ) -> None:
        """Prepare a forward over cache rows `rows` (a slice, or slot indices (B,)) whose new tokens go to
        `write_index` (B, Q)."""
        self._rows, self._write_index, self._kv_len = rows, write_index, kv_len
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=write_index.device)
        self._batch_index = rows[:, None]  # (B, 1): the slot of each row
        self.positions[self._batch_index, write_index] = write_positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, ...]:
        """Write key/value (B, Hkv, Q, D) at the bound places; return the rows' (B, Hkv, kv_len, D) keys and values."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._batch_index, :, self._write_index] = key.transpose(1, 2)  # (B, Q, Hkv, D)
        values[self._batch_index, :, self._write_index] = value.transpose(1, 2)
        return keys[self._rows, :, : self._kv_len], values[self._rows, :, : self._kv_len]

    def reset_slot(self, slot: int, prompt_ids: Sequence[int]) -> None:
        """Empty a slot for a new sequence whose prompt counts as seen."""
        self.positions[slot] = -1
        self.seen[slot] = False
        self.seen[slot, list(prompt_ids)] = True

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's first `length` entries (and its seen tokens) from slot `src` to slot `dst`."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
        self.positions[dst] = -1
        self.positions[dst, :length] = self.positions[src, :length]
        self.seen[dst] = self.seen[src]

    def swap_slots(self, a: int, b: int) -> None:
        for tensor in [*self.keys, *self.values, self.positions, self.seen]:
            tensor[[a, b]] = tensor[[b, a]]

    def read_block(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of entries [start, end) of a slot, all layers: two (layers, Hkv, end - start, D)."""
        return (
            torch.stack([k[slot, :, start:end] for k in self.keys]),
            torch.stack([v[slot, :, start:end] for v in self.values]),
        )

    def write_block(self, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = start + keys.shape[2]
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            k[slot, :, start:end] = keys[layer]
            v[slot, :, start:end] = values[layer]
        self.positions[slot, start:end] = torch.arange(start, end, device=self.positions.device)


class PrefixCache:
    """Keys/values of full prompt blocks, keyed by the hash of the block's tokens *and everything before it*, so a hit
    means the whole prefix matches. Least recently used blocks are evicted."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self.blocks: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.queries = 0  # in blocks

    @staticmethod
    def block_hashes(token_ids: Sequence[int]) -> list[int]:
        hashes, parent = [], 0
        for start in range(0, len(token_ids) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
            parent = hash((parent, tuple(token_ids[start : start + PREFIX_BLOCK])))
            hashes.append(parent)
        return hashes

    def lookup(self, hashes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached blocks for the longest cached run of `hashes` from the start."""
        found = []
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            found.append(self.blocks[h])
        self.queries += len(hashes)
        self.hits += len(found)
        return found

    def insert(self, h: int, block: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.blocks[h] = block
        self.blocks.move_to_end(h)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)
