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

import time
from collections.abc import Iterator

import torch

from llada_ray.decoding.batch import Decoder, StopCheck
from llada_ray.decoding.engine import EngineOptions
from llada_ray.decoding.sampling import Generation, Sampling, choose
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

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """A block alone, and a block with the previous one committing along."""
        B = self.block_size
        return [(B, B, B), (2 * B, B, B)]

    def positions_needed(self, prompt_length: int, max_new_tokens: int) -> int:
        """The last block is decoded whole, so the end rounds up to a block boundary."""
        return -(-(prompt_length + max_new_tokens) // self.block_size) * self.block_size

    def _open(
        self, blocks: torch.Tensor, given: torch.Tensor, wanted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(open [R, B], ends [R]): the masked positions whose token can still reach the output,
        and whether the output ends inside this block.

        A position reaches the output before the request's token budget runs out and up to its
        first generated EOS (the prompt's tail, `given` positions, may hold EOS too: chat
        templates end turns with it). Accepted tokens are final, so once no position is open
        the request's part of the block is decided, and if its output ends here it is done.
        """
        B = blocks.shape[1]
        position = torch.arange(B, device=blocks.device)
        generated_eos = (blocks == self.eos) & (position >= given[:, None])
        eos_at = torch.where(generated_eos, position, B).min(-1).values
        end = torch.minimum(wanted, eos_at + 1)
        return (blocks == self.mask) & (position < end[:, None]), (eos_at < B) | (wanted <= B)

    @torch.no_grad()
    def stream(
        self,
        prompts: list[list[int]],
        sampling: Sampling | list[Sampling],
        seeds: list[int | None] | None = None,
        stop: StopCheck | None = None,
    ) -> Iterator[list[Generation]]:
        """Yields every request's Generation (growing in place) after each decoded block.

        Only open positions (see `_open`) are accepted, by threshold or forced, so every forward
        decides a token of the output. A request whose output is complete leaves the batch before
        the next forward; the others finish the block.
        """
        started = time.perf_counter()
        samplings, generators, out = self._start(prompts, sampling, seeds)
        B, R = self.block_size, len(prompts)
        batch = self._batch(R)
        device = batch.device
        starts = [len(p) // B * B for p in prompts]
        batch.prefill([p[:s] for p, s in zip(prompts, starts, strict=True)], B)
        blocks = torch.full((R, B), self.mask, dtype=torch.long, device=device)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            blocks[r, : len(p) - s] = torch.tensor(p[s:], device=device)
        block_start = torch.tensor(starts, device=device)
        alive = list(range(R))  # working row → request

        def given_of(r: int, w: int) -> int:
            return max(0, len(prompts[r]) - int(block_start[w]))

        def keep_rows(keep: list[int]) -> None:
            nonlocal blocks, block_start, alive
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            batch.select(rows)
            blocks, block_start = blocks[rows], block_start[rows]
            alive = [alive[w] for w in keep]

        while alive:
            index = block_start[:, None] + torch.arange(B, device=device)
            given = torch.tensor([given_of(r, w) for w, r in enumerate(alive)], device=device)
            wanted = given + torch.tensor(
                [samplings[r].max_new_tokens - len(out[r].tokens) for r in alive], device=device
            )
            thresholds = torch.tensor([samplings[r].threshold for r in alive], device=device)
            min_accept = torch.tensor([samplings[r].min_accept for r in alive], device=device)
            while True:
                open_, ends = self._open(blocks, given, wanted)
                running = open_.any(-1)
                if (done := ~running & ends).any():  # complete: leave before the next forward
                    now = time.perf_counter() - started
                    for w in done.nonzero().flatten().tolist():
                        r = alive[w]
                        self._extend(out[r], blocks[w, given_of(r, w) :].tolist(), samplings[r],
                                     None, now)  # fmt: skip
                    keep = (~done).nonzero().flatten()
                    keep_rows(keep.tolist())
                    index, given, wanted, thresholds, min_accept = (
                        x[keep] for x in (index, given, wanted, thresholds, min_accept)
                    )
                    open_, running = open_[keep], running[keep]
                if not running.any():
                    break
                active = running.tolist()
                logits = batch.forward(blocks, index, B, clean=False)
                logits[..., self.mask] = float("-inf")  # a mask is never a candidate
                candidates, confidence = choose(
                    logits, [samplings[r] for r in alive], [generators[r] for r in alive], active
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
                for w, r in enumerate(alive):
                    out[r].forwards += active[w]
                blocks = torch.where(accept, candidates, blocks)

            now = time.perf_counter() - started
            for w, r in enumerate(alive):
                check = None if stop is None else (lambda r=r: stop(r, out[r].tokens))
                self._extend(out[r], blocks[w, given_of(r, w) :].tolist(), samplings[r], check, now)
            yield out
            keep = [w for w, r in enumerate(alive) if not out[r].done]
            if len(keep) < len(alive):
                index = index[keep]
                keep_rows(keep)
            if not alive:
                break
            batch.commit(blocks, index)
            block_start = block_start + B
            blocks = torch.full_like(blocks, self.mask)
