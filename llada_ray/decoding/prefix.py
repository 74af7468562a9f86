"""A prefix cache shared across requests: the keys and values of prompt pages, reused. Pure torch.

A page is `page` prompt tokens at positions [j·page, (j+1)·page). Its keys and values depend on
the tokens up to its end and nothing else (prefills are clean and block-causal, with `page` a
multiple of the block size), so a page is stored under (its parent page's id, its own tokens):
a chain that names the whole prefix, compared token by token (a dict key, never a hash alone),
so a hit is exact. Pages live in a pool allocated once (the size is the bound); the least
recently used page is evicted first, and a prompt's chain is touched from its last page back to
its first, so a parent is never older than its children (a child outlives its parent only when it
is unreachable, and ages out). The engine looks a prompt up (`load`) and stores it (`store`)
on every prefill.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

MIB = 2**20


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hit_tokens: int = 0  # prompt tokens restored from the cache
    computed_tokens: int = 0  # prompt tokens prefilled (not found)
    pages: int = 0  # pages held
    capacity_pages: int = 0
    page_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.computed_tokens
        return self.hit_tokens / total if total else 0.0

    def summary(self) -> dict:
        return {
            "lookups": self.lookups,
            "hit_tokens": self.hit_tokens,
            "computed_tokens": self.computed_tokens,
            "hit_rate": round(self.hit_rate, 4),
            "pages": self.pages,
            "capacity_pages": self.capacity_pages,
            "bytes": self.pages * self.page_bytes,
            "capacity_bytes": self.capacity_pages * self.page_bytes,
        }


class PrefixCache:
    """Pages of keys and values for `keys` / `values` (per layer: [rows, kv_heads, length, dim],
    the engine's KV cache), at most `capacity_mb` of them."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], page: int, capacity_mb: float
    ) -> None:
        _, heads, _, dim = keys[0].shape
        shape = (heads, page, dim)
        page_bytes = 2 * len(keys) * heads * page * dim * keys[0].element_size()
        capacity = int(capacity_mb * MIB // page_bytes)
        if capacity < 1:
            raise ValueError(f"a prefix cache of {capacity_mb} MiB holds no {page}-token page")
        self.keys, self.values, self.page = keys, values, page

        def pool() -> list[torch.Tensor]:
            return [x.new_empty((capacity, *shape)) for x in keys]

        self.pool_keys, self.pool_values = pool(), pool()
        self.index: OrderedDict[tuple[int, tuple[int, ...]], tuple[int, int]] = OrderedDict()
        self.free = list(range(capacity))
        self.next_id = 1  # 0 is the root: the empty prefix
        self.stats = PrefixStats(capacity_pages=capacity, page_bytes=page_bytes)

    def _pages(self, tokens: list[int]) -> list[tuple[int, ...]]:
        p = self.page
        return [tuple(tokens[j : j + p]) for j in range(0, len(tokens) // p * p, p)]

    def _found(self, pages: list[tuple[int, ...]]) -> list[tuple[int, int]]:
        """(pool slot, id) of the prompt's leading pages that are cached, in order."""
        found, parent = [], 0
        for tokens in pages:
            entry = self.index.get((parent, tokens))
            if entry is None:
                break
            found.append(entry)
            parent = entry[1]
        return found

    def load(self, tokens: list[int], row: int) -> int:
        """Write the cached leading pages of `tokens` into `row` of the KV cache; returns how
        many tokens that restored (a multiple of the page)."""
        found = self._found(self._pages(tokens))
        n = len(found) * self.page
        if found:
            slots = torch.tensor([slot for slot, _ in found], device=self.keys[0].device)
            for cache, pool in ((self.keys, self.pool_keys), (self.values, self.pool_values)):
                for x, stored in zip(cache, pool, strict=True):
                    # [pages, heads, page, dim] → [heads, pages·page, dim]
                    x[row, :, :n] = stored[slots].transpose(0, 1).flatten(1, 2)
        self.stats.lookups += 1
        self.stats.hit_tokens += n
        self.stats.computed_tokens += len(tokens) - n
        return n

    def store(self, tokens: list[int], row: int) -> None:
        """Keep the full pages of `tokens` (now in `row` of the KV cache) that are not cached;
        the least recently used pages make room (never this prompt's own)."""
        pages = self._pages(tokens)[: self.stats.capacity_pages]
        found = self._found(pages)
        keys = [(found[j - 1][1] if j else 0, pages[j]) for j in range(len(found))]
        self._touch(keys)
        parent = found[-1][1] if found else 0
        for j in range(len(found), len(pages)):
            if not self.free:
                _, (slot, _) = self.index.popitem(last=False)
                self.free.append(slot)
            slot, entry_id = self.free.pop(), self.next_id
            self.next_id += 1
            at = slice(j * self.page, (j + 1) * self.page)
            for cache, pool in ((self.keys, self.pool_keys), (self.values, self.pool_values)):
                for x, stored in zip(cache, pool, strict=True):
                    stored[slot] = x[row, :, at]
            keys.append((parent, pages[j]))
            self.index[keys[-1]] = (slot, entry_id)
            parent = entry_id
        self._touch(keys)
        self.stats.pages = len(self.index)

    def _touch(self, chain: list[tuple[int, tuple[int, ...]]]) -> None:
        """Most recently used, the deepest page first: the root ends newest, leaves evict first."""
        for key in reversed(chain):
            self.index.move_to_end(key)
