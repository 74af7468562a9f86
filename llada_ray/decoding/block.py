"""Block-diffusion decoding with an exact prefix KV cache (RECIPE.md §5). Pure torch.

Blocks are aligned to absolute positions: the first block a request decodes may hold the tail of
its prompt. Per block: fill the rest with mask tokens, run the model on the block against the KV
cache of every earlier position, accept every masked position whose confidence exceeds τ (at
least `min_accept`, the most confident), and repeat until the block has no mask. The finished
block's KV is written as clean tokens by the next block's first forward (fused: no extra call).
Committed tokens attend block-causally (as training's clean half), so the cache is exact:
decoding with it gives the tokens of decoding without it.
"""

from __future__ import annotations

import torch

from llada_ray.decoding.batch import (
    CachedBatch,
    ContextLimit,
    Decoder,
    RecomputeBatch,
    Request,
    Run,
)
from llada_ray.decoding.engine import EngineOptions
from llada_ray.decoding.sampling import choose
from llada_ray.model.adapter import DiffusionLM


class BlockDecoder(Decoder):
    """Decodes a batch of prompts with a DiffusionLM; `use_cache=False` recomputes the prefix at
    every step (the reference the cache must match, and the benchmark's no-cache baseline)."""

    def __init__(
        self,
        dlm: DiffusionLM,
        eos_token_id: int,
        block_size: int = 32,
        use_cache: bool = True,
        max_length: int | None = None,
        engine: EngineOptions | None = None,
    ) -> None:
        super().__init__(dlm, eos_token_id, use_cache, max_length, engine)
        self.block_size = block_size
        if self.options.prefix_cache_mb and self.options.page % block_size:
            # A page's keys and values must depend on its own tokens and earlier ones only.
            raise ValueError(f"prefix cache page {self.options.page} is not whole blocks of "
                             f"{block_size}")  # fmt: skip

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """A block alone, and a block with the previous one committing along."""
        B = self.block_size
        return [(B, B, B), (2 * B, B, B)]

    @property
    def limit(self) -> ContextLimit:
        return ContextLimit(self.max_length, self.block_size)

    def _open(
        self, blocks: torch.Tensor, given: torch.Tensor, wanted: torch.Tensor, eos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(open [R, B], ends [R]): the masked positions whose token can still reach the output,
        and whether the output ends inside this block.

        A position reaches the output before the request's token budget runs out and up to its
        first generated EOS, in rows where `eos` says EOS ends the output (the prompt's tail,
        `given` positions, may hold EOS too: chat templates end turns with it). Accepted tokens
        are final, so once no position is open the request's part of the block is decided, and
        if its output ends here it is done.
        """
        B = blocks.shape[1]
        position = torch.arange(B, device=blocks.device)
        generated_eos = (blocks == self.eos) & (position >= given[:, None]) & eos[:, None]
        eos_at = torch.where(generated_eos, position, B).min(-1).values
        end = torch.minimum(wanted, eos_at + 1)
        return (blocks == self.mask) & (position < end[:, None]), (eos_at < B) | (wanted <= B)

    def open(self) -> BlockRun:
        return BlockRun(self, self._batch())


class BlockRun(Run):
    """A running batch of block decodes. A step decodes one block of every request: forwards
    until no position of any block is open. Requests that joined since the last step start it
    with their first block (their prompt's whole blocks prefilled as they join), so they wait for
    at most one block of the others.

    Only open positions (see `BlockDecoder._open`) are accepted, by threshold or forced, so every
    forward decides a token of the output. A request whose output is complete leaves before the
    next forward; the others finish the block.
    """

    def __init__(self, decoder: BlockDecoder, batch: CachedBatch | RecomputeBatch) -> None:
        super().__init__(batch)
        self.decoder = decoder
        B, device = decoder.block_size, batch.device
        self.blocks = torch.zeros((0, B), dtype=torch.long, device=device)  # [R, B]
        self.block_start = torch.zeros(0, dtype=torch.long, device=device)  # [R]

    def _join(self, requests: list[Request]) -> list[int]:
        """Whole blocks of the prompts become context; the tail (if any) starts the first block."""
        B, device = self.decoder.block_size, self.batch.device
        prompts = [r.prompt for r in requests]
        starts = [len(p) // B * B for p in prompts]
        restored = self.batch.add([p[:s] for p, s in zip(prompts, starts, strict=True)], B)
        blocks = torch.full((len(prompts), B), self.decoder.mask, dtype=torch.long, device=device)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            blocks[r, : len(p) - s] = torch.tensor(p[s:], device=device)
        self.blocks = torch.cat([self.blocks, blocks])
        self.block_start = torch.cat([self.block_start, torch.tensor(starts, device=device)])
        return restored

    def _select(self, rows: torch.Tensor) -> None:
        self.blocks, self.block_start = self.blocks[rows], self.block_start[rows]

    def _given(self) -> torch.Tensor:
        """Per row, how many positions of its block hold its prompt's tail."""
        starts = self.block_start.tolist()
        tails = [max(0, len(r.prompt) - s) for r, s in zip(self.requests, starts, strict=True)]
        return torch.tensor(tails, dtype=torch.long, device=self.batch.device)

    def _advance(self) -> None:
        d, batch = self.decoder, self.batch
        B, device = d.block_size, batch.device
        index = self.block_start[:, None] + torch.arange(B, device=device)
        given = self._given()
        wanted = given + torch.tensor(
            [r.sampling.max_new_tokens - len(r.out.tokens) for r in self.requests], device=device
        )
        thresholds = torch.tensor([r.sampling.threshold for r in self.requests], device=device)
        min_accept = torch.tensor([r.sampling.min_accept for r in self.requests], device=device)
        eos = torch.tensor([not r.sampling.ignore_eos for r in self.requests], device=device)
        ltr_rows = [r.sampling.order == "left_to_right" for r in self.requests]
        in_order_rows = [
            r.sampling.eos_in_order and not r.sampling.ignore_eos for r in self.requests
        ]
        any_ltr, any_in_order = any(ltr_rows), any(in_order_rows)  # host lists: no device sync
        ltr = torch.tensor(ltr_rows, device=device)
        in_order = torch.tensor(in_order_rows, device=device)
        while True:
            open_, ends = d._open(self.blocks, given, wanted, eos)
            running = open_.any(-1)
            if (done := ~running & ends).any():  # complete: leave before the next forward
                for w in done.nonzero().flatten().tolist():
                    d._extend(self.requests[w], self.blocks[w, int(given[w]) :].tolist())
                keep = (~done).nonzero().flatten()
                self._keep(keep.tolist())
                index, given, wanted, thresholds, min_accept, eos, ltr, in_order = (
                    x[keep]
                    for x in (index, given, wanted, thresholds, min_accept, eos, ltr, in_order)
                )
                open_, running = open_[keep], running[keep]
            if not running.any():
                break
            active = running.tolist()
            logits = batch.forward(self.blocks, index, B, clean=False)
            logits[..., d.mask] = float("-inf")  # a mask is never a candidate
            candidates, confidence = choose(
                logits,
                [r.sampling for r in self.requests],
                [r.generator for r in self.requests],
                active,
            )
            confidence = confidence.masked_fill(~open_, -1.0)
            accept = (confidence > thresholds[:, None]) & open_
            # At least min_accept per row (as many as are open): its most confident.
            need = torch.minimum(min_accept, open_.sum(-1))
            if (short := accept.sum(-1) < need).any():
                ranked = confidence.topk(int(need.max()), -1).indices
                wanted_rank = torch.arange(ranked.shape[1], device=device) < need[:, None]
                forced = torch.zeros_like(accept).scatter_(1, ranked, wanted_rank)
                accept |= forced & short[:, None]
            leftmost = open_ & (open_.cumsum(-1) == 1)
            if any_in_order:  # nothing past the predicted end; its EOS only once in order
                position = torch.arange(B, device=device)
                eos_here = open_ & (candidates == d.eos)
                end = torch.where(eos_here, position, B).min(-1, keepdim=True).values
                waiting = open_ & ~accept & (position < end)
                ordered = accept & (position <= end) & ~(eos_here & (waiting.cumsum(-1) > 0))
                ordered |= leftmost & ~ordered.any(-1, keepdim=True)  # never nothing
                accept = torch.where(in_order[:, None], ordered, accept)
            if any_ltr:  # those rows take their leftmost open position alone
                accept = torch.where(ltr[:, None], leftmost, accept)
            for r, a in zip(self.requests, active, strict=True):
                r.out.forwards += a
            self.blocks = torch.where(accept, candidates, self.blocks)

        for w, r in enumerate(self.requests):
            d._extend(r, self.blocks[w, int(given[w]) :].tolist())
        keep = [w for w, r in enumerate(self.requests) if not r.out.done]
        self._keep(keep)
        if self.requests:
            batch.commit(self.blocks, index[keep])
            self.block_start = self.block_start + B
            self.blocks = torch.full_like(self.blocks, d.mask)
