"""The state both decoders share: a batch of requests over one model and its context.

Two implementations with one interface (`add`, `commit`, `forward`, `select`):
  - `CachedBatch`: the static-shape engine (engine.py): a preallocated KV cache, bucketed and
    compiled steps. What the decoders run.
  - `RecomputeBatch`: no cache; every forward recomputes the whole context, clean and
    block-causal, eagerly, with the model's own attention backend. The reference the engine is
    tested against (`use_cache=False`), and the benchmark's no-cache baseline.
Rows join between forwards (`add`) and leave when they finish (`select`), so a long request
does not make the short ones of its batch pay for it, and a new one need not wait for it: that
is continuous batching, driven by a decoder's `Run`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

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
    """Rows on the static engine, row w in cache row w. Each row's context is its positions
    [0, context): committed clean tokens in the cache. `commit` holds clean tokens back until the
    next forward, which writes them along with its queries (committing a finished block costs no
    forward of its own); the queries' keys and values are written at their positions too, and
    overwritten by the next step unless `keep` made them context (AR decoding). Rows join
    (`add`) between forwards and leave (`select`) at any point."""

    def __init__(self, engine: StaticEngine) -> None:
        self.engine = engine
        self.device = engine.device
        self.context = torch.zeros(0, dtype=torch.long, device=self.device)
        # (ids, positions, has): clean tokens each row commits with its next forward; a row
        # without (`has` False: it joined since, or has no block to commit) sends copies of its
        # last queries there instead.
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.written = 0  # positions below this may hold this batch's keys and values

    @property
    def capacity(self) -> int:
        return self.engine.max_batch

    def add(self, prompts: list[list[int]], block_size: int) -> list[int]:
        """New rows after the others, each with `prompts[i]` (whole blocks) as context; returns
        how many of each prompt's tokens came from the prefix cache."""
        first = len(self.context)
        if first + len(prompts) > self.capacity:
            raise ValueError(f"{first + len(prompts)} rows exceed max_batch {self.capacity}")
        restored = self.engine.prefill(first, prompts, block_size)
        self.written = max(self.written, *map(len, prompts))
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        self.context = torch.cat([self.context, lengths])
        if self.pending is not None:
            ids, index, has = self.pending
            none = torch.zeros((len(prompts), ids.shape[1]), dtype=ids.dtype, device=self.device)
            nothing = torch.zeros_like(lengths, dtype=torch.bool)
            self.pending = (torch.cat([ids, none]), torch.cat([index, none]),
                            torch.cat([has, nothing]))  # fmt: skip
        return restored

    def commit(
        self, ids: torch.Tensor, index: torch.Tensor, has: torch.Tensor | None = None
    ) -> None:
        """Clean tokens right after each row's context (of the rows `has` says, default all),
        written by the next forward."""
        if has is None:
            has = torch.ones(len(ids), dtype=torch.bool, device=self.device)
        self.pending = (ids, index, has)

    def forward(
        self,
        ids: torch.Tensor,
        index: torch.Tensor,
        block_size: int,
        *,
        clean: bool | torch.Tensor,
        present: torch.Tensor | None = None,
        keep: bool = False,
    ) -> torch.Tensor:
        """Logits [R, n, V] of `ids` at positions `index` (a run per row that starts where the
        context, pending tokens included, ends), clean or noisy (per position, or all).

        `present` [R, n] False marks queries a row does not have (their logits are not read):
        the caller gives them a copy of one of the row's noisy queries, its token, position and
        flag, which here writes the same keys and values to the same cache column twice."""
        n = ids.shape[1]
        flags = _flags(ids, clean)
        committing = self.pending is not None
        if committing:  # after the queries: their logits are the first n
            p_ids, p_index, has = self.pending
            # A row with nothing to commit repeats its last (noisy) queries: the same keys and
            # values written twice at the same positions, so the step's shape stays one for all.
            k = p_ids.shape[1]
            p_ids = torch.where(has[:, None], p_ids, ids[:, -k:])
            p_index = torch.where(has[:, None], p_index, index[:, -k:])
            ids, index = torch.cat([ids, p_ids], 1), torch.cat([index, p_index], 1)
            flags = torch.cat([flags, has[:, None] | flags[:, -k:]], 1)
            self.pending = None
        end = int(index.max()) + 1
        logits = self.engine.step(ids, index, flags, self.context, block_size, n, end)
        self.written = max(self.written, end)
        if committing:  # the context ends after the committed tokens (last in the step)
            self.context = torch.where(has, index[:, -1] + 1, self.context)
        if keep:
            self.context = index[:, n - 1] + 1
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these working rows (increasing indices into the current batch)."""
        self.engine.cache.keep(rows, self.written)
        self.context = self.context[rows]
        if self.pending is not None:
            self.pending = tuple(x[rows] for x in self.pending)


class RecomputeBatch:
    """The reference: committed context kept as tokens, recomputed by every forward (left-padded
    to a common width, so every row decodes as it would alone)."""

    def __init__(self, dlm: DiffusionLM, capacity: int) -> None:
        self.dlm, self.capacity = dlm, capacity
        self.device = next(dlm.parameters()).device
        empty = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.context = (empty, empty, empty)  # ids, index, doc of tokens already committed

    def add(self, prompts: list[list[int]], block_size: int) -> list[int]:
        new = left_padded(prompts, self.device)
        width = max(self.context[0].shape[1], new[0].shape[1])
        self.context = tuple(
            torch.cat([_pad_left(old, width, fill), _pad_left(x, width, fill)])
            for old, x, fill in zip(self.context, new, (0, 0, PAD_DOC), strict=True)
        )
        return [0] * len(prompts)

    def commit(
        self, ids: torch.Tensor, index: torch.Tensor, has: torch.Tensor | None = None
    ) -> None:
        doc = torch.full_like(ids, REAL_DOC)
        if has is not None:  # rows with nothing to commit add padding (no one attends to it)
            doc = torch.where(has[:, None], doc, PAD_DOC)
        self.context = tuple(
            torch.cat([c, x], 1) for c, x in zip(self.context, (ids, index, doc), strict=True)
        )

    def forward(
        self,
        ids: torch.Tensor,
        index: torch.Tensor,
        block_size: int,
        *,
        clean: bool | torch.Tensor,
        present: torch.Tensor | None = None,
        keep: bool = False,
    ) -> torch.Tensor:
        ctx_ids, ctx_index, ctx_doc = self.context
        doc = torch.full_like(ids, REAL_DOC)
        if present is not None:  # absent queries are padding: no real token sees them
            doc = torch.where(present, doc, PAD_DOC)
        flags = _flags(ids, clean)
        keys = Tokens(ctx_index, torch.ones_like(ctx_ids, dtype=torch.bool), ctx_doc).cat(
            Tokens(index, flags, doc)
        )
        inputs = torch.cat([ctx_ids, ids], 1)
        logits = self.dlm(inputs, AttentionLayout(keys, keys, block_size), keys.index)
        if keep:
            self.commit(ids, index)
        return logits[:, -ids.shape[1] :]

    def select(self, rows: torch.Tensor) -> None:
        self.context = tuple(x[rows] for x in self.context)


def _flags(ids: torch.Tensor, clean: bool | torch.Tensor) -> torch.Tensor:
    """Per-position clean flags [R, n] of queries that are all clean, all noisy, or as given."""
    return (
        clean if isinstance(clean, torch.Tensor) else torch.full_like(ids, clean, dtype=torch.bool)
    )


def _pad_left(x: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=fill)


@dataclass(eq=False)
class Request:
    """One prompt in a running batch. `cancelled` may be set from any thread: the request leaves
    at the batch's next step."""

    prompt: list[int]
    sampling: Sampling
    generator: torch.Generator | None = None
    stop: Callable[[list[int]], bool] | None = None  # tokens so far → finished?
    out: Generation = field(default_factory=Generation)
    cancelled: bool = False
    started: float = 0.0  # when it joined the batch (perf_counter)


class Run:
    """A running batch: requests join (`add`) between steps, up to the batch's capacity, and
    leave as soon as they finish or are cancelled. What a step is depends on the decoder: a block
    for every request, or a token."""

    def __init__(self, batch: CachedBatch | RecomputeBatch) -> None:
        self.batch = batch
        self.requests: list[Request] = []  # working row → request
        self.joining: list[Request] = []  # added since the last step

    @property
    def room(self) -> int:
        return self.batch.capacity - len(self.requests) - len(self.joining)

    def __bool__(self) -> bool:
        return bool(self.requests or self.joining)

    def add(self, request: Request) -> None:
        if self.room < 1:
            raise ValueError(f"the batch is full ({self.batch.capacity} requests)")
        request.started = time.perf_counter()
        self.joining.append(request)

    @torch.no_grad()
    def step(self) -> None:
        """Admit the requests that joined, drop the cancelled, advance the rest by one step."""
        if self.joining:
            restored = self._join(self.joining)
            for request, cached in zip(self.joining, restored, strict=True):
                request.out.cached_tokens = cached
            self.requests += self.joining
            self.joining = []
        self._drop_cancelled()
        if self.requests:
            self._advance()

    def _join(self, requests: list[Request]) -> list[int]:
        """New rows for these requests (their prompts prefilled); the prompt tokens each got
        from the prefix cache."""
        raise NotImplementedError

    def _advance(self) -> None:
        raise NotImplementedError

    def _keep(self, keep: list[int]) -> None:
        """Only these working rows stay (increasing)."""
        if len(keep) == len(self.requests):
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.batch.device)
        self.batch.select(rows)
        self.requests = [self.requests[w] for w in keep]
        self._select(rows)

    def _select(self, rows: torch.Tensor) -> None:
        """The decoder's own per-row state follows `_keep`."""
        raise NotImplementedError

    def _drop_cancelled(self) -> None:
        """Cancelled requests are marked finished and leave (between steps only: a step's
        forwards run over a fixed set of rows)."""
        for r in self.requests:
            if r.cancelled and not r.out.done:
                r.out.finish_reason = "cancelled"
        self._keep([w for w, r in enumerate(self.requests) if not r.cancelled])


StopCheck = Callable[[int, list[int]], bool]  # (request index, tokens so far) → finished?


@dataclass(frozen=True)
class ContextLimit:
    """Whether a request fits a decoder's context; needs no model (a server checks requests
    with it in the process that serves HTTP)."""

    max_length: int
    block: int = 1  # the last block is decoded whole: the end rounds up to a block boundary

    def positions_needed(self, prompt_length: int, max_new_tokens: int) -> int:
        return -(-(prompt_length + max_new_tokens) // self.block) * self.block

    def check(self, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse a request whose positions would run past the context."""
        if prompt_length < 1:
            raise ValueError("the prompt is empty")
        needed = self.positions_needed(prompt_length, max_new_tokens)
        if needed > self.max_length:
            raise ValueError(
                f"prompt ({prompt_length} tokens) plus max_tokens ({max_new_tokens}) needs "
                f"{needed} positions; the model's context is {self.max_length}"
            )


class Decoder:
    """What every decoder shares: per-request settings, the context limit, when a request ends,
    and running batches (`open`) that requests join and leave between steps."""

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
        self.options = engine or EngineOptions()
        self.engine = StaticEngine(dlm, self.max_length, self.options) if use_cache else None

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """(queries, block size, logits) of every step this decoder runs."""
        raise NotImplementedError

    def warm_up(self, rows: list[int] | None = None) -> None:
        """Compile every shape this decoder can meet (for these batch buckets; default all)."""
        if self.engine is not None:
            self.engine.warm_up(self.step_shapes(), rows)

    def open(self) -> Run:
        """An empty running batch."""
        raise NotImplementedError

    def _batch(self) -> CachedBatch | RecomputeBatch:
        if self.engine is None:
            return RecomputeBatch(self.dlm, self.options.max_batch)
        return CachedBatch(self.engine)

    @property
    def limit(self) -> ContextLimit:
        return ContextLimit(self.max_length)

    def check(self, prompt_length: int, max_new_tokens: int) -> None:
        self.limit.check(prompt_length, max_new_tokens)

    def request(
        self,
        prompt: list[int],
        sampling: Sampling,
        seed: int | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> Request:
        """A request this decoder can run (or a ValueError saying why not)."""
        self.check(len(prompt), sampling.max_new_tokens)
        device = next(self.dlm.parameters()).device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        return Request(list(prompt), sampling, generator, stop)

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
        """Yields every prompt's Generation (growing in place) after each step. Prompts join a
        running batch in order as rows free up, so there may be more than `max_batch`."""
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        seeds = seeds or [None] * len(prompts)
        requests = [
            self.request(p, s, seed, None if stop is None else partial(stop, i))
            for i, (p, s, seed) in enumerate(zip(prompts, samplings, seeds, strict=True))
        ]
        run, waiting = self.open(), deque(requests)
        while run or waiting:
            while waiting and run.room:
                run.add(waiting.popleft())
            run.step()
            yield [r.out for r in requests]

    def _extend(self, r: Request, new: list[int]) -> None:
        """Append a step's tokens; end at EOS, at max_new_tokens, or when `r.stop` says so."""
        g, s = r.out, r.sampling
        new = new[: s.max_new_tokens - len(g.tokens)]
        if self.eos in new and not s.ignore_eos:
            end = new.index(self.eos) + 1
            g.tokens += new[:end]
            g.discarded += sum(t != self.mask for t in new[end:])
            g.finish_reason = "stop"
        else:
            g.tokens += new
            if r.stop is not None and r.stop(g.tokens):
                g.finish_reason = "stop"
            elif len(g.tokens) >= s.max_new_tokens:
                g.finish_reason = "length"
        if g.done:
            g.seconds = time.perf_counter() - r.started
