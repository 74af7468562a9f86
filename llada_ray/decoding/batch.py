"""The state both decoders share: a batch of requests over one model and its context.

Two implementations with one interface (`prefill`, `commit`, `forward`, `select`):
  - `CachedBatch`: the static-shape engine (engine.py): a preallocated KV cache, bucketed and
    compiled steps. What the decoders run.
  - `RecomputeBatch`: no cache; every forward recomputes the whole context, clean and
    block-causal, eagerly, with the model's own attention backend. The reference the engine is
    tested against (`use_cache=False`), and the benchmark's no-cache baseline.
Rows that finish are dropped (`select`), so a long request does not make the short ones of its
batch pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from llada_ray.decoding.engine import EngineOptions, StaticEngine
from llada_ray.decoding.sampling import Generation, Sampling
from llada_ray.diffusion.masks import AttentionLayout, Tokens
from llada_ray.model.adapter import DiffusionLM

PAD_DOC, REAL_DOC = -1, 0


def left_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """ids, positions (from 0) and documents [R, width] of rows aligned on their last token.

    Padding is a document of its own (it attends only to padding, so it never produces NaN, and
    no real token attends to it), so a row decodes exactly as it would alone."""
    width = max(map(len, rows), default=0)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    index = torch.zeros_like(ids)
    doc = torch.full_like(ids, PAD_DOC)
    for r, row in enumerate(rows):
        if row:
            ids[r, width - len(row) :] = torch.tensor(row, device=device)
            index[r, width - len(row) :] = torch.arange(len(row), device=device)
            doc[r, width - len(row) :] = REAL_DOC
    return ids, index, doc


class CachedBatch:
    """A batch on the static engine. Each row's context is its positions [0, context): committed
    clean tokens in the cache. `commit` holds clean tokens back until the next forward, which
    writes them along with its queries (committing a finished block costs no forward of its
    own); the queries' keys and values are written at their positions too, and overwritten by
    the next step unless `keep` made them context (AR decoding)."""

    def __init__(self, engine: StaticEngine, rows: int) -> None:
        if rows > engine.max_batch:
            raise ValueError(f"a batch of {rows} requests exceeds max_batch {engine.max_batch}")
        self.engine = engine
        self.device = engine.device
        self.context = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, positions)
        self.written = 0  # positions below this may hold this batch's keys and values

    def prefill(self, prompts: list[list[int]], block_size: int) -> None:
        """The prompts' first tokens (whole blocks) as context."""
        self.engine.prefill(prompts, block_size)
        self.written = max(map(len, prompts), default=0)
        self.context = torch.tensor([len(p) for p in prompts], device=self.device)

    def commit(self, ids: torch.Tensor, index: torch.Tensor) -> None:
        """Clean tokens right after each row's context, written by the next forward."""
        self.pending = (ids, index)

    def forward(
        self,
        ids: torch.Tensor,
        index: torch.Tensor,
        block_size: int,
        *,
        clean: bool,
        keep: bool = False,
    ) -> torch.Tensor:
        """Logits [R, n, V] of `ids` at positions `index` (a run per row that starts where the
        context, pending tokens included, ends)."""
        n = ids.shape[1]
        flags = torch.full_like(ids, clean, dtype=torch.bool)
        committing = self.pending is not None
        if committing:  # after the queries: their logits are the first n
            p_ids, p_index = self.pending
            ids, index = torch.cat([ids, p_ids], 1), torch.cat([index, p_index], 1)
            flags = torch.cat([flags, torch.ones_like(p_ids, dtype=torch.bool)], 1)
            self.pending = None
        end = int(index.max()) + 1
        logits = self.engine.step(ids, index, flags, self.context, block_size, n, end)
        self.written = max(self.written, end)
        if committing:  # the context ends after the committed tokens (last in the step)
            self.context = index[:, -1] + 1
        if keep:
            self.context = index[:, n - 1] + 1
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these working rows (increasing indices into the current batch)."""
        self.engine.cache.keep(rows, self.written)
        self.context = self.context[rows]
        if self.pending is not None:
            self.pending = (self.pending[0][rows], self.pending[1][rows])


class RecomputeBatch:
    """The reference: committed context kept as tokens, recomputed by every forward (left-padded
    to a common width, so every row decodes as it would alone)."""

    def __init__(self, dlm: DiffusionLM, rows: int) -> None:
        self.dlm = dlm
        self.device = next(dlm.parameters()).device
        empty = torch.zeros((rows, 0), dtype=torch.long, device=self.device)
        self.context = (empty, empty, empty)  # ids, index, doc of tokens already committed

    def prefill(self, prompts: list[list[int]], block_size: int) -> None:
        self.context = left_padded(prompts, self.device)

    def commit(self, ids: torch.Tensor, index: torch.Tensor) -> None:
        doc = torch.full_like(ids, REAL_DOC)
        self.context = tuple(
            torch.cat([c, x], 1) for c, x in zip(self.context, (ids, index, doc), strict=True)
        )

    def forward(
        self,
        ids: torch.Tensor,
        index: torch.Tensor,
        block_size: int,
        *,
        clean: bool,
        keep: bool = False,
    ) -> torch.Tensor:
        ctx_ids, ctx_index, ctx_doc = self.context
        doc = torch.full_like(ids, REAL_DOC)
        keys = Tokens(ctx_index, torch.ones_like(ctx_ids, dtype=torch.bool), ctx_doc).cat(
            Tokens(index, torch.full_like(ids, clean, dtype=torch.bool), doc)
        )
        inputs = torch.cat([ctx_ids, ids], 1)
        logits = self.dlm(inputs, AttentionLayout(keys, keys, block_size), keys.index)
        if keep:
            self.commit(ids, index)
        return logits[:, -ids.shape[1] :]

    def select(self, rows: torch.Tensor) -> None:
        self.context = tuple(x[rows] for x in self.context)


StopCheck = Callable[[int, list[int]], bool]  # (request index, tokens so far) → finished?


class Decoder:
    """What every decoder shares: per-request settings, the context limit, when a request ends."""

    def __init__(
        self,
        dlm: DiffusionLM,
        eos_token_id: int,
        use_cache: bool = True,
        max_length: int | None = None,
        engine: EngineOptions | None = None,
    ) -> None:
        """`use_cache=False`: the uncompiled recompute reference instead of the static engine
        (a KV cache for `engine.max_batch` rows of `max_length` positions)."""
        self.dlm, self.eos = dlm.eval(), eos_token_id
        self.mask = dlm.mask_token_id
        context = dlm.hf.config.max_position_embeddings
        if max_length is not None and max_length > context:
            raise ValueError(f"max_length {max_length} exceeds the model's context ({context})")
        self.max_length: int = max_length or context
        self.engine = (
            StaticEngine(dlm, self.max_length, engine or EngineOptions()) if use_cache else None
        )

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """(queries, block size, logits) of every step this decoder runs."""
        raise NotImplementedError

    def warm_up(self, rows: list[int] | None = None) -> None:
        """Compile every shape this decoder can meet (for these batch buckets; default all)."""
        if self.engine is not None:
            self.engine.warm_up(self.step_shapes(), rows)

    def _batch(self, rows: int) -> CachedBatch | RecomputeBatch:
        if self.engine is None:
            return RecomputeBatch(self.dlm, rows)
        return CachedBatch(self.engine, rows)

    def positions_needed(self, prompt_length: int, max_new_tokens: int) -> int:
        return prompt_length + max_new_tokens

    def check(self, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse a request whose positions would run past the model's context."""
        if prompt_length < 1:
            raise ValueError("the prompt is empty")
        needed = self.positions_needed(prompt_length, max_new_tokens)
        if needed > self.max_length:
            raise ValueError(
                f"prompt ({prompt_length} tokens) plus max_tokens ({max_new_tokens}) needs "
                f"{needed} positions; the model's context is {self.max_length}"
            )

    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling | list[Sampling],
        seeds: list[int | None] | None = None,
        stop: StopCheck | None = None,
    ) -> list[Generation]:
        out: list[Generation] = []
        for step in self.stream(prompts, sampling, seeds, stop):
            out = step
        return out

    def stream(
        self,
        prompts: list[list[int]],
        sampling: Sampling | list[Sampling],
        seeds: list[int | None] | None = None,
        stop: StopCheck | None = None,
    ) -> Iterator[list[Generation]]:
        raise NotImplementedError

    def _start(
        self,
        prompts: list[list[int]],
        sampling: Sampling | list[Sampling],
        seeds: list[int | None] | None,
    ) -> tuple[list[Sampling], list[torch.Generator | None], list[Generation]]:
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        for p, s in zip(prompts, samplings, strict=True):
            self.check(len(p), s.max_new_tokens)
        device = next(self.dlm.parameters()).device
        generators = [
            None if seed is None else torch.Generator(device).manual_seed(seed)
            for seed in (seeds or [None] * len(prompts))
        ]
        return samplings, generators, [Generation() for _ in prompts]

    def _extend(
        self,
        g: Generation,
        new: list[int],
        s: Sampling,
        stop: Callable[[], bool] | None,
        seconds: float,
    ) -> None:
        """Append a step's tokens; end at EOS, at max_new_tokens, or when `stop()` says so."""
        new = new[: s.max_new_tokens - len(g.tokens)]
        if self.eos in new:
            g.tokens += new[: new.index(self.eos) + 1]
            g.finish_reason = "stop"
        else:
            g.tokens += new
            if stop is not None and stop():
                g.finish_reason = "stop"
            elif len(g.tokens) >= s.max_new_tokens:
                g.finish_reason = "length"
        if g.done:
            g.seconds = seconds
