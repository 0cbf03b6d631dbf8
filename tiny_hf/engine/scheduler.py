"""The scheduler: which requests run, in which cache slot, and how much of each prompt is computed per step.

Why continuous batching: requests join the running batch as soon as a slot frees up and leave it the step they
finish, instead of a batch running from start to end (Orca, Yu et al. 2022). Why chunked prefill: each step spends
at most `token_budget` tokens, one per decoding sequence first and the rest on prompt chunks, so a long prompt never
stalls the sequences already decoding (Sarathi, Agrawal et al. 2023). The decoding sequences always hold the slots
[0, n), so a decode step reads a contiguous slice of the cache.
"""

from __future__ import annotations

from collections import deque

from .kv_cache import PREFIX_BLOCK, PrefixCache, SlotKVCache
from .sequence import ContextWindowError, QueueFullError, Request

WINDOW_POLICIES = ("reject", "truncate", "sliding")


def fit_messages(tokenizer, messages: list[dict], *, budget: int, policy: str) -> tuple[list[int], int]:
    """Apply the chat template; if the prompt is longer than `budget` tokens, "truncate" drops the oldest turns after
    the system prompt (never the last message) until it fits, and "reject" raises `ContextWindowError`.

    Returns:
        The prompt ids and how many messages were dropped.
    """
    if policy not in WINDOW_POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {list(WINDOW_POLICIES)}")

    def encode(msgs):
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))

    ids, dropped = encode(messages), 0
    if policy != "truncate":
        return ids, 0  # "reject" and "sliding" are the engine's to apply
    kept = list(messages)
    first = 1 if kept and kept[0].get("role") == "system" else 0
    while len(ids) > budget and len(kept) - first > 1:
        del kept[first]
        dropped += 1
        ids = encode(kept)
    if len(ids) > budget:
        raise ContextWindowError(
            f"the prompt is {len(ids)} tokens even with only the system prompt and the last message; the budget is "
            f"{budget} tokens"
        )
    return ids, dropped


class Scheduler:
    """Queues, slots and the per-step plan.

    Args:
        cache: The slot cache (one slot per running request).
        max_queue: Requests that may wait for a slot; one more raises `QueueFullError`.
        token_budget: Most tokens computed per step (decode tokens plus prompt chunks).
        prefix_cache_tokens: Prompt tokens whose KV is kept for reuse (0 turns prefix caching off).
        window_policy: What to do with a prompt that does not fit: one of WINDOW_POLICIES.
        chunk_limit: Most tokens of one prompt per forward (the ring cache needs fewer than the window).
    """

    def __init__(
        self,
        cache: SlotKVCache,
        *,
        max_queue: int,
        token_budget: int,
        prefix_cache_tokens: int,
        window_policy: str,
        chunk_limit: int,
    ):
        self.cache, self.max_queue, self.token_budget = cache, max_queue, token_budget
        self.window_policy, self.ring, self.chunk_limit = window_policy, window_policy == "sliding", chunk_limit
        use_prefix_cache = prefix_cache_tokens and not self.ring
        self.prefix_cache = PrefixCache(prefix_cache_tokens // PREFIX_BLOCK) if use_prefix_cache else None
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not fully computed; in arrival order
        self.decoding: list[Request] = []  # decoding[i].slot == i: the batch is the contiguous rows [0, n)
        self.slot_owner: list[Request | None] = [None] * cache.seen.shape[0]

    def fit(self, ids: list[int], max_tokens: int | None) -> list[int]:
        """Apply the window policy to a prompt (token ids) that wants `max_tokens` more."""
        window, wanted = self.cache.max_len, max_tokens or 0
        if self.ring or len(ids) + wanted <= window and len(ids) < window:
            return ids
        if self.window_policy == "truncate":
            keep = window - max(wanted, min(256, window // 4))
            if keep < 1:
                raise ContextWindowError(
                    f"max_tokens={wanted} leaves no room for a prompt in the {window}-token window"
                )
            return ids[-keep:]
        raise ContextWindowError(
            f"this model's context window is {window} tokens, but the request needs {len(ids) + wanted} "
            f"({len(ids)} in the prompt, {wanted} for the completion); shorten the prompt or lower max_tokens"
        )

    def enqueue(self, request: Request) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests); retry later")
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots (FIFO), reusing cached prefix blocks; returns the admitted ones."""
        admitted = []
        while self.waiting and None in self.slot_owner:
            request = self.waiting.popleft()
            # The lowest free slot: prompts finish in arrival order, so each usually finishes in the very slot it
            # moves to as a decoding row (len(self.decoding)), and no keys/values need copying.
            slot = self.slot_owner.index(None)
            request.slot, self.slot_owner[slot] = slot, request
            self.cache.reset_slot(slot, request.prompt_ids)
            if self.prefix_cache is not None:
                # Reuse whole blocks only, and leave at least one prompt token to compute (its logits are needed).
                hashes = PrefixCache.block_hashes(request.prompt_ids[: len(request.prompt_ids) - 1])
                for i, (keys, values) in enumerate(self.prefix_cache.lookup(hashes)):
                    self.cache.write_block(
                        slot, i * PREFIX_BLOCK, *(t.to(self.cache.seen.device) for t in (keys, values))
                    )
                    request.num_computed += PREFIX_BLOCK
            self.prefilling.append(request)
            admitted.append(request)
        return admitted

    def plan_prefill(self) -> list[list[tuple[Request, int]]]:
        """This step's prompt chunks (first come first served, within the budget the decode step leaves), grouped
        into forwards: longest first, a group grows while its padded size (rows x longest chunk) stays within
        `token_budget`. With the ring cache each prompt gets its own forward: a padding key would overwrite a live
        ring entry."""
        budget, chunks = self.token_budget - len(self.decoding), []
        for request in self.prefilling:
            if budget <= 0:
                break
            chunk = min(budget, self.chunk_limit, len(request.prompt_ids) - request.num_computed)
            budget -= chunk
            chunks.append((request, chunk))
        if self.ring:
            return [[c] for c in chunks]
        groups: list[list[tuple[Request, int]]] = []
        for request, chunk in sorted(chunks, key=lambda c: -c[1]):
            if groups and (len(groups[-1]) + 1) * groups[-1][0][1] <= self.token_budget:
                groups[-1].append((request, chunk))
            else:
                groups.append([(request, chunk)])
        return groups

    def start_decoding(self, request: Request) -> None:
        """The prompt is in the cache: remember its blocks and move the request into the decoding rows [0, n)."""
        self._remember_prefix(request)
        slot = request.slot
        self.prefilling.remove(request)
        target = len(self.decoding)
        if slot != target:
            other = self.slot_owner[target]
            if other is None:
                self.cache.copy_slot(slot, target, min(request.num_computed, self.cache.max_len))
            else:  # another prompt is being computed in the target slot: trade places
                self.cache.swap_slots(slot, target)
                other.slot, self.slot_owner[slot] = slot, other
            if self.slot_owner[slot] is request:
                self.slot_owner[slot] = None
            request.slot, self.slot_owner[target] = target, request
        self.decoding.append(request)

    def _remember_prefix(self, request: Request) -> None:
        if self.prefix_cache is None:
            return
        for i, h in enumerate(PrefixCache.block_hashes(request.prompt_ids)):
            if h not in self.prefix_cache.blocks:
                keys, values = self.cache.read_block(request.slot, i * PREFIX_BLOCK, (i + 1) * PREFIX_BLOCK)
                self.prefix_cache.insert(h, (keys.clone(), values.clone()))

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out, freeing its slot; the last decoding row fills a hole, so the
        decoding rows stay contiguous."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.prefilling:
            self.prefilling.remove(request)
            self.slot_owner[request.slot] = None
        elif request in self.decoding:
            index, last = request.slot, self.decoding[-1]
            if last is not request:
                self.cache.copy_slot(last.slot, index, min(last.num_computed, self.cache.max_len))
                self.slot_owner[last.slot] = None
                last.slot, self.slot_owner[index], self.decoding[index] = index, last, last
            else:
                self.slot_owner[index] = None
            self.decoding.pop()
