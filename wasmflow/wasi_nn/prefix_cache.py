"""Which sequence of a shared llama context holds which tokens, and where a new request starts.

A new request whose prompt starts with tokens that are already evaluated (the review bot's
instructions, a chat history) starts from that state instead of evaluating them again. Two sources:

- a sequence that is generating now: its positions are copied (`seq_cp`; in a unified KV cache the
  cells are shared, nothing is copied), so four reviews of four PRs opened together share one prefix;
- a finished request's state, saved out of the context into host memory (`llama_state_seq_get_data`)
  when it ended and restored into the new request's sequence (`set_data`, then the tail cut off).

Finished requests are saved *out* of the context rather than left in it because in a unified KV cache
every sequence's attention runs over every used cell (masked): idle entries left in the cells would make
each decode step slower for everyone. Saved entries are bounded by a byte budget, least recently used
dropped first; an entry whose tokens are a prefix of a newer one is replaced by it.

Correctness rests on one rule: a sequence's `tokens` list (and a saved entry's) is exactly what its KV
holds, position i holding tokens[i], and only a common *token* prefix is ever reused, so a request can
never start from the state of a different prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol


class KvOps(Protocol):
    """The KV-cache operations the cache needs (llama_memory_seq_* and llama_state_seq_* on a context)."""

    def rm(self, seq: int, p0: int, p1: int) -> bool: ...

    def cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def save(self, seq: int) -> Optional[tuple[Any, int]]: ...

    def load(self, seq: int, blob: Any, size: int) -> bool: ...


@dataclass
class Slot:
    """One sequence id of the context."""

    seq: int
    tokens: list[int] = field(default_factory=list)  # what the KV holds for this sequence, in position order
    busy: bool = False  # a request is generating on it


@dataclass(eq=False)
class Saved:
    """A finished request's KV state, outside the context."""

    tokens: list[int]
    blob: Any
    size: int
    used: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    saved_tokens: int = 0
    evictions: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """The slot table of one context: `claim` a slot for a prompt, `release` it when the request ends."""

    def __init__(self, n_slots: int, budget_bytes: int, kv: KvOps, min_reuse: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self.saved: list[Saved] = []
        self.budget_bytes = max(0, budget_bytes)
        self.kv = kv
        self.min_reuse = min_reuse  # a shared BOS alone is not worth a copy
        self.clock = clock
        self.stats = CacheStats()

    # -- queries ---------------------------------------------------------------------------------

    def cached_bytes(self) -> int:
        """Host memory the saved entries take: what the budget bounds."""
        return sum(e.size for e in self.saved)

    def cached_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.saved)

    # -- claiming and releasing ------------------------------------------------------------------

    def claim(self, prompt: list[int]) -> Optional[tuple[Slot, int]]:
        """A free slot for `prompt` and how many of its tokens are already in that slot's KV, or None
        when every slot is busy. The slot's KV then holds exactly prompt[:reused]."""
        target = next((s for s in self.slots if not s.busy), None)
        if target is None:
            return None
        best, source, entry = 0, None, None
        for slot in self.slots:
            if slot.busy and slot.tokens:
                n = common_prefix(slot.tokens, prompt)
                if n > best:
                    best, source, entry = n, slot, None
        for saved in self.saved:
            n = common_prefix(saved.tokens, prompt)
            if n > best:
                best, source, entry = n, None, saved
        # the last prompt token is always evaluated again: its logits give the first new token
        reused = min(best, len(prompt) - 1)
        if reused < self.min_reuse:
            reused = 0
        self.kv.rm(target.seq, -1, -1)
        if reused and source is not None:
            self.kv.cp(source.seq, target.seq, 0, reused)
        elif reused and entry is not None:
            if self.kv.load(target.seq, entry.blob, entry.size) and self.kv.rm(target.seq, reused, -1):
                entry.used = self.clock()
            else:  # the state did not fit back (a full context) or cannot be cut there: start cold
                self.kv.rm(target.seq, -1, -1)
                reused = 0
        target.tokens = list(prompt[:reused])
        if reused:
            self.stats.hits += 1
            self.stats.saved_tokens += reused
        else:
            self.stats.misses += 1
        target.busy = True
        return target, reused

    def release(self, slot: Slot, keep: bool = True) -> None:
        """The request on `slot` ended: save its KV out of the context (within the budget), then free
        the sequence's cells."""
        if keep and len(slot.tokens) >= self.min_reuse and self.budget_bytes:
            state = self.kv.save(slot.seq)
            if state is not None and state[1] <= self.budget_bytes:
                tokens = list(slot.tokens)
                # an entry that is a prefix of this one adds nothing
                self.saved = [e for e in self.saved if common_prefix(e.tokens, tokens) < len(e.tokens)]
                self.saved.append(Saved(tokens, state[0], state[1], self.clock()))
        self.kv.rm(slot.seq, -1, -1)
        slot.tokens = []
        slot.busy = False
        self.trim()

    def trim(self) -> None:
        while self.cached_bytes() > self.budget_bytes and self.evict_one():
            pass

    def evict_one(self) -> bool:
        """Drop the least recently used saved entry; False if there is none."""
        if not self.saved:
            return False
        self.saved.remove(min(self.saved, key=lambda e: e.used))
        self.stats.evictions += 1
        return True
