"""The static-shape decode engine: a preallocated KV cache and one compiled step per bucket.

The decoders decide *what* to accept; this decides *how* a forward runs. Every shape a compiled
step sees comes from a small fixed set, so torch.compile traces each once, at warm-up:
  - the cache is a tensor [max_batch, kv_heads, max_length, head_dim] per layer for keys and
    for values; a token's keys and values sit at its absolute position (column = position), so
    rows of different lengths need no padding, and dropping a row moves only the rows behind it;
  - a step's queries are [rows, n] against the cache's first `L` columns, rows padded up to a
    batch bucket (powers of two) and `L` rounded up to a length bucket (the bucket setting times
    a power of two); which cached keys each query sees is a boolean mask computed from the
    attention rule (`allowed`) inside the step, fused into its graph;
  - attention is SDPA with `enable_gqa` (no repeat_interleave of the cache). FlexAttention stays
    the training kernel: at decode its block mask changes with every key length, which is
    exactly the recompilation it must not have.
On CUDA the compiled steps are CUDA graphs (`mode="reduce-overhead"`); the cache tensors are
marked static addresses, so the graphs write them in place. A prefill (a prompt's whole blocks,
once as it joins) runs eagerly, after copying what the prefix cache holds of it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from llada_ray.decoding.prefix import PrefixCache
from llada_ray.diffusion.masks import allowed
from llada_ray.model.adapter import DiffusionLM

Compile = Literal["auto", "on", "off"]
UNUSED_DOC = -1  # the document of cache columns no token of this step's rows holds


@dataclass(frozen=True)
class EngineOptions:
    """The engine's shape limits: rows decoded together, the length bucket, and whether to
    compile: "on" (CUDA graphs on CUDA, inductor on CPU), "off" (eager), "auto" (on for CUDA;
    off on CPU, where compiling every bucket takes minutes on a laptop's cores). A prefix cache
    of `prefix_cache_mb` (0: none) keeps prompt pages of `page` tokens across requests."""

    max_batch: int = 16
    length_bucket: int = 256
    compile: Compile = "auto"
    prefix_cache_mb: float = 0.0
    page: int = 32


def length_buckets(max_length: int, bucket: int) -> list[int]:
    """bucket, 2·bucket, 4·bucket, … up to the first that holds max_length: few enough shapes
    to compile every one ahead (a step attends to at most twice the keys it needs)."""
    sizes = [bucket]
    while sizes[-1] < max_length:
        sizes.append(sizes[-1] * 2)
    return sizes


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


class KVCache:
    """Keys and values of every row and position, allocated once: per layer, a tensor
    [max_batch, kv_heads, max_length, head_dim] each (separate tensors: a compiled step updates
    each in place, where a slice of one stacked tensor would be copied whole every step)."""

    def __init__(self, dlm: DiffusionLM, max_batch: int, max_length: int) -> None:
        config = dlm.hf.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        weight = dlm.hf.get_input_embeddings().weight
        shape = (
            max_batch,
            config.num_key_value_heads or config.num_attention_heads,
            max_length,
            head_dim,
        )

        def zeros() -> list[torch.Tensor]:
            return [
                torch.zeros(shape, dtype=weight.dtype, device=weight.device)
                for _ in range(config.num_hidden_layers)
            ]

        self.keys, self.values = zeros(), zeros()

    def keep(self, rows: torch.Tensor, length: int) -> None:
        """Rows `rows` (increasing) become rows 0..len(rows)-1: only rows that move are copied,
        and of those only the first `length` positions (what the batch has written)."""
        target = torch.arange(len(rows), device=rows.device)
        moved = rows != target
        if moved.any():
            source, target = rows[moved], target[moved]
            for x in (*self.keys, *self.values):  # the right side is gathered before it is written
                x[target, :, :length] = x[source, :, :length]


class CachedAttention:
    """A step's attention for cache rows [first, first + rows): write the queries' keys and
    values at their positions, then attend over the first `mask.shape[-1]` columns under `mask`
    [rows, 1, n, L]."""

    def __init__(
        self, cache: KVCache, positions: torch.Tensor, mask: torch.Tensor, first: int = 0
    ) -> None:
        self.cache, self.positions, self.mask, self.first = cache, positions, mask, first

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, layer: int
    ) -> torch.Tensor:
        rows, length, first = self.mask.shape[0], self.mask.shape[-1], self.first
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        # index_put on the whole tensor, not a scatter into a view of it: compiled, the write
        # happens in place (a view's would be materialised and copied back).
        row = torch.arange(first, first + rows, device=q.device)[:, None]
        keys[row, :, self.positions] = k.transpose(1, 2)
        values[row, :, self.positions] = v.transpose(1, 2)
        return F.scaled_dot_product_attention(
            q,
            keys[first : first + rows, :, :length],
            values[first : first + rows, :, :length],
            attn_mask=self.mask,
            scale=scale,
            enable_gqa=True,
        )


def step_mask(
    positions: torch.Tensor, clean: torch.Tensor, context: torch.Tensor, length: int, block: int
) -> torch.Tensor:
    """Which cache columns each query of a step sees: [R, 1, n, length], by the attention rule.

    A row's queries (positions [R, n], clean [R, n]) are a run that starts at or before its
    `context` [R], the first position not committed before the step (committing tokens ride
    along as clean queries). After the step's writes, column j holds a clean token below the
    end of the row's clean queries, a noisy one (the block) up to the end of its queries, and
    nothing after. Every query sees at least itself: no NaN anywhere, not even in padding rows
    (a NaN left in the cache would reach real rows through masked columns: 0 · NaN = NaN).
    """
    R = positions.shape[0]
    end = positions.max(-1).values + 1
    clean_end = torch.where(clean, positions + 1, context[:, None]).max(-1).values
    column = torch.arange(length, device=positions.device).expand(R, length)
    real = torch.zeros((R, length), dtype=torch.long, device=positions.device)
    return allowed(
        positions[:, :, None],
        clean[:, :, None],
        real[:, :1, None],
        column[:, None, :],
        (column < clean_end[:, None])[:, None, :],
        torch.where(column < end[:, None], real, UNUSED_DOC)[:, None, :],
        block,
    )[:, None]


class StaticEngine:
    """Runs a DiffusionLM step by step over a KVCache, compiled per shape bucket.

    A step's shape is (rows, queries, keys, logits, block size); compiled, rows round up to a
    batch bucket and keys to a length bucket (eager, nothing is padded; prefills are eager).
    The mask is computed inside the step from the queries' positions and flags (fused into the
    graph: no mask tensor crosses the call). A shape's first call compiles it; `warm_up`
    compiles ahead.
    """

    def __init__(self, dlm: DiffusionLM, max_length: int, options: EngineOptions) -> None:
        self.dlm = dlm
        self.lengths = length_buckets(max_length, options.length_bucket)
        self.batches = batch_buckets(options.max_batch)
        self.cache = KVCache(dlm, options.max_batch, self.lengths[-1])
        self.device = self.cache.keys[0].device
        self.prefix = (
            PrefixCache(self.cache.keys, self.cache.values, options.page, options.prefix_cache_mb)
            if options.prefix_cache_mb > 0
            else None
        )
        self.compiled = None
        self.warm: set[tuple[int, ...]] = set()  # shapes compiled so far
        cuda = self.device.type == "cuda"
        if options.compile == "on" or (options.compile == "auto" and cuda):
            if cuda:
                for x in (*self.cache.keys, *self.cache.values):
                    torch._dynamo.mark_static_address(x)
            # One graph per bucket and step kind: let dynamo keep them all.
            graphs = len(self.lengths) * len(self.batches) * 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
            self.compiled = torch.compile(
                self._forward, mode="reduce-overhead" if cuda else None, dynamic=False
            )

    @property
    def max_batch(self) -> int:
        return self.batches[-1]

    @property
    def max_length(self) -> int:
        return self.lengths[-1]

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        clean: torch.Tensor,
        context: torch.Tensor,
        length: int,
        block: int,
        logits_for: int,
        first: int = 0,
    ) -> torch.Tensor:
        mask = step_mask(positions, clean, context, length, block)
        runner = CachedAttention(self.cache, positions, mask, first)
        return self.dlm(ids, runner, positions, logits_for=logits_for)

    @torch.no_grad()
    def prefill(self, first: int, prompts: list[list[int]], block: int) -> list[int]:
        """Rows first, first+1, …: write each prompt's tokens at positions 0..len-1, clean and
        block-causal (each a whole number of blocks). Pages found in the prefix cache are
        copied, the rest computed in one forward; returns the tokens restored per row.

        Eager at every setting: a prefill runs once per request, and its width is the prompt's,
        where a compiled step would need a graph per (width, length) pair. Rows shorter than
        the widest are padded on positions after their own, which their later tokens overwrite
        before anything attends to them."""
        if first + len(prompts) > self.max_batch:
            raise ValueError(f"rows {first}..{first + len(prompts) - 1} exceed max_batch")
        restored = [
            0 if self.prefix is None else self.prefix.load(p, first + r)
            for r, p in enumerate(prompts)
        ]
        width = max((len(p) - h for p, h in zip(prompts, restored, strict=True)), default=0)
        if width:
            ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
            for r, (p, h) in enumerate(zip(prompts, restored, strict=True)):
                ids[r, : len(p) - h] = torch.tensor(p[h:], dtype=torch.long, device=self.device)
            context = torch.tensor(restored, device=self.device)
            positions = context[:, None] + torch.arange(width, device=self.device)
            positions = positions.clamp(max=self.max_length - 1)  # padding only
            end = int(positions.max()) + 1
            clean = torch.ones_like(ids, dtype=torch.bool)
            self._forward(ids, positions, clean, context, end, block, 0, first)
        if self.prefix is not None:
            for r, p in enumerate(prompts):
                self.prefix.store(p, first + r)
        return restored

    def _bucket(self, buckets: list[int], size: int) -> int:
        """The bucket a size rounds up to; eager, the size itself (padding would only cost)."""
        return size if self.compiled is None else buckets[bisect.bisect_left(buckets, size)]

    @torch.no_grad()
    def warm_up(self, steps: list[tuple[int, int, int]], rows: list[int] | None = None) -> None:
        """Compile ahead: every (queries, block, logits) step shape, for each batch bucket in
        `rows` (default all) and each length bucket. The cache rows are scratch until a batch
        starts, so this runs between batches only."""
        if self.compiled is None:
            return
        shapes = {(n, length, b, logits) for n, b, logits in steps for length in self.lengths}
        for r in rows or self.batches:
            for n, length, block, logits_for in sorted(shapes):
                if n > length:
                    continue
                ids = torch.zeros((r, n), dtype=torch.long, device=self.device)
                positions = torch.arange(length - n, length, device=self.device).expand(r, n)
                clean = torch.ones_like(ids, dtype=torch.bool)
                context = torch.zeros(r, dtype=torch.long, device=self.device)
                # CUDA graphs are recorded on a shape's third call (two warm-up runs first).
                for _ in range(3 if self.device.type == "cuda" else 1):
                    self.step(ids, positions, clean, context, block, logits_for, length)

    @torch.no_grad()
    def step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        clean: torch.Tensor,
        context: torch.Tensor,
        block: int,
        logits_for: int,
        end: int,
    ) -> torch.Tensor:
        """Logits [R, logits_for, V] of the first `logits_for` queries of each of R rows.

        ids, positions, clean [R, n]: the step's tokens (each row's a run of positions, see
        `step_mask`); their keys and values are written at their positions. `end`: one past the
        largest position (the caller knows it; reading it here would sync with the device).
        """
        R, n = ids.shape
        rows = self._bucket(self.batches, R)
        length = self._bucket(self.lengths, end)
        if rows > R:  # bucket padding: rows that write only to their own (unused) cache rows
            pad = rows - R
            filler = torch.arange(n, device=self.device).expand(pad, n)
            ids = torch.cat([ids, ids[:1].expand(pad, n)])
            positions = torch.cat([positions, filler])
            clean = torch.cat([clean, clean.new_ones(pad, n)])  # every query sees itself
            context = torch.cat([context, context.new_zeros(pad)])
        args = (_packed(ids), _packed(positions), _packed(clean), context, length, block)
        if self.compiled is None:
            return self._forward(*args, logits_for)[:R]
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        shape = (rows, n, length, block, logits_for)
        if shape not in self.warm:  # the first call of a shape compiles it
            self.warm.add(shape)
            return self.compiled(*args, logits_for)[:R]
        # A warm shape: dynamo checks only the guards that tell its graphs apart (every other
        # input is the same tensors, same shapes, every call), not all ~100 of them.
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.compiled(*args, logits_for)[:R]


def _packed(x: torch.Tensor) -> torch.Tensor:
    """x with the strides of a new tensor of its shape. Graphs are specialised on strides, even
    of size-1 dims (which `contiguous()` leaves as they are): one layout per shape."""
    natural, step = [], 1
    for size in reversed(x.shape):
        natural.insert(0, step)
        step *= max(size, 1)
    return x if x.stride() == tuple(natural) else x.clone(memory_format=torch.contiguous_format)
