"""The state both decoders share: a batch of requests over one model, its KV cache and its context.

Requests of different lengths decode together: their tokens are left-padded to a common width;
padding is a document of its own (it attends only to padding, so it never produces NaN, and no
real token attends to it), so a row decodes exactly as it would alone. Rows that finish are
dropped from every tensor and from the cache, so a long request does not make the short ones of
its batch pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache

from llada_ray.decoding.sampling import Generation, Sampling
from llada_ray.diffusion.masks import AttentionLayout, Tokens
from llada_ray.model.adapter import DiffusionLM
from llada_ray.model.attention import MaskedAttention

PAD_DOC, REAL_DOC = -1, 0


def left_padded(
    rows: list[list[int]], starts: list[int], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, absolute positions and documents [R, width] of rows placed from their `starts`."""
    width = max(map(len, rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    index = torch.zeros_like(ids)
    doc = torch.full_like(ids, PAD_DOC)
    for r, (row, start) in enumerate(zip(rows, starts, strict=True)):
        if row:
            ids[r, width - len(row) :] = torch.tensor(row, device=device)
            index[r, width - len(row) :] = torch.arange(start, start + len(row), device=device)
            doc[r, width - len(row) :] = REAL_DOC
    return ids, index, doc


class DecodeBatch:
    """Committed context (in the KV cache, or recomputed every call without one) plus the
    `pending` clean tokens that the next forward writes into the cache along with its queries:
    committing a finished block costs no forward of its own."""

    def __init__(self, dlm: DiffusionLM, rows: int, use_cache: bool) -> None:
        self.dlm = dlm
        self.device = next(dlm.parameters()).device
        self.cache = DynamicCache() if use_cache else None
        empty = torch.zeros((rows, 0), dtype=torch.long, device=self.device)
        self.context = (empty, empty, empty)  # ids, index, doc of tokens already committed
        self.pending = (empty, empty, empty)
        # The attention of the last forward that left the context as it was (a block's steps
        # after its first): the same queries and keys until the next commit or row selection.
        self._reusable: tuple[tuple, MaskedAttention] | None = None

    def commit(self, ids: torch.Tensor, index: torch.Tensor, doc: torch.Tensor) -> None:
        """Clean tokens that become context with the next forward."""
        self.pending = tuple(
            torch.cat([p, x], 1) for p, x in zip(self.pending, (ids, index, doc), strict=True)
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
        """Logits [R, n, V] of `ids` at absolute positions `index` against the context.

        The pending tokens join the context. The queries join it too if `keep` (AR decoding);
        otherwise they are dropped from the cache again: a block under denoising changes every step.
        """
        doc = torch.full_like(ids, REAL_DOC)
        ctx_ids, ctx_index, ctx_doc = self.context
        p_ids, p_index, p_doc = self.pending
        changes_context = keep or p_ids.shape[1] > 0
        key = (ids.shape, clean, block_size)
        if self.cache is None:  # recompute the whole committed context, clean and block-causal
            inputs = torch.cat([ctx_ids, p_ids, ids], 1)
        else:
            inputs = torch.cat([p_ids, ids], 1)
        if self._reusable is not None and self._reusable[0] == key and not changes_context:
            attention = self._reusable[1]
        else:
            clean_flags = torch.cat([torch.ones_like(p_ids), torch.full_like(ids, int(clean))], 1)
            new = Tokens(
                torch.cat([p_index, index], 1), clean_flags.bool(), torch.cat([p_doc, doc], 1)
            )
            past = Tokens(ctx_index, torch.ones_like(ctx_ids, dtype=torch.bool), ctx_doc)
            keys = past.cat(new)
            queries = keys if self.cache is None else new
            attention = self.dlm.prepare(AttentionLayout(queries, keys, block_size))
            self._reusable = None if changes_context else (key, attention)
        positions = torch.cat([ctx_index, p_index, index], 1)[:, -inputs.shape[1] :]
        logits = self.dlm(inputs, attention, positions, cache=self.cache)
        if self.cache is not None and not keep:
            self.cache.crop(-ids.shape[1])  # a negative count: tokens to drop from the end
        if changes_context:
            joined = [self.pending, (ids, index, doc)] if keep else [self.pending]
            self.context = tuple(
                torch.cat([c, *(part[j] for part in joined)], 1) for j, c in enumerate(self.context)
            )
            self.pending = tuple(x[:, :0] for x in self.pending)
        return logits[:, -ids.shape[1] :]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these working rows (indices into the current batch)."""
        self.context = tuple(x[rows] for x in self.context)
        self.pending = tuple(x[rows] for x in self.pending)
        self._reusable = None
        if self.cache is not None:
            # Not cache.batch_select_indices: it skips layers holding no tokens yet (prompts
            # shorter than a block), which keep the old batch size.
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.keys, layer.values = layer.keys[rows], layer.values[rows]


StopCheck = Callable[[int, list[int]], bool]  # (request index, tokens so far) → finished?


class Decoder:
    """What every decoder shares: per-request settings, the context limit, when a request ends."""

    def __init__(
        self,
        dlm: DiffusionLM,
        eos_token_id: int,
        use_cache: bool = True,
        max_length: int | None = None,
    ) -> None:
        self.dlm, self.eos, self.use_cache = dlm.eval(), eos_token_id, use_cache
        self.mask = dlm.mask_token_id
        self.max_length: int = max_length or dlm.hf.config.max_position_embeddings

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
