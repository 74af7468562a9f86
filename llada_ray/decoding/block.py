"""Block-diffusion decoding with an exact prefix KV cache (RECIPE.md §5, §7). Pure torch.

Blocks are aligned to absolute positions: the first block a request decodes may hold the tail of
its prompt. Per block: fill the rest with mask tokens, run the model on the block against the KV
cache of every earlier position, accept every masked position whose confidence exceeds τ (at
least `min_accept`, the most confident), and repeat until the block has no mask. The finished
block's KV is written as clean tokens by the next block's first forward (fused: no extra call).
Committed tokens attend block-causally (as training's clean half), so the cache is exact:
decoding with it gives the tokens of decoding without it.

Token editing (LLaDA2.1, a request's `edit_threshold`): the same forwards also replace decided
answer tokens the model is sure are wrong, and a block is final only once an edit-only forward
changes nothing (or after `max_post_edit_steps` of them). With `multi_block_edit` a step decodes
a window of two blocks: a block moves on once its masks are gone, and while the next one
decodes it rides along every forward as clean queries (its keys and values rewritten each time,
so the cache stays exact however it changes; a clean block with no mask sees what the noisy
copy training edits does), edited where the model is sure; it is final once a forward leaves
it as it was (greedy: the same logits give the same candidates; sampled candidates are drawn
anew every forward). Its check costs no forward of its own, except in the block an answer
ends in.
A block reaches the output only when it is final, so nothing streamed is ever taken back.
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
        multi_block_edit: bool = False,
    ) -> None:
        super().__init__(dlm, eos_token_id, use_cache, max_length, engine)
        self.block_size = block_size
        self.multi_block_edit = multi_block_edit
        if self.options.prefix_cache_mb and self.options.page % block_size:
            # A page's keys and values must depend on its own tokens and earlier ones only.
            raise ValueError(f"prefix cache page {self.options.page} is not whole blocks of "
                             f"{block_size}")  # fmt: skip

    @property
    def window(self) -> int:
        """Positions a step decodes: the block, and the previous one with multi-block editing."""
        return self.block_size * (2 if self.multi_block_edit else 1)

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """A window alone, and a window with the final block before it committing along."""
        B, W = self.block_size, self.window
        return [(W, B, W), (W + B, B, W)]

    @property
    def limit(self) -> ContextLimit:
        return ContextLimit(self.max_length, self.block_size)

    def _open(
        self, window: torch.Tensor, given: torch.Tensor, wanted: torch.Tensor, eos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(open [R, W], decided [R, W], ends [R]): the masked positions whose token can still
        reach the output, the decided ones that can (what editing may replace), and whether the
        output ends inside this window.

        A position reaches the output before the request's token budget runs out and up to its
        first generated EOS, in rows where `eos` says EOS ends the output (the prompt's tail,
        `given` positions, may hold EOS too: chat templates end turns with it). Once no
        position is open (and edits are done) the request's part of the window is decided, and
        if its output ends here it is done.
        """
        W = window.shape[1]
        position = torch.arange(W, device=window.device)
        answer = position >= given[:, None]
        generated_eos = (window == self.eos) & answer & eos[:, None]
        eos_at = torch.where(generated_eos, position, W).min(-1).values
        end = torch.minimum(wanted, eos_at + 1)
        answer &= position < end[:, None]
        masked = window == self.mask
        return masked & answer, ~masked & answer, (eos_at < W) | (wanted <= W)

    def open(self) -> BlockRun:
        return BlockRun(self, self._batch())


class BlockRun(Run):
    """A running batch of block decodes. A step decodes one block of every request: forwards
    until no position of any block is open and every edit is done. Requests that joined since
    the last step start it with their first block (their prompt's whole blocks prefilled as they
    join), so they wait for at most one block of the others.

    Only open positions (see `BlockDecoder._open`) are accepted, by threshold or forced, so every
    forward decides a token of the output or checks an edit. A request whose output is complete
    leaves before the next forward; the others finish the block, and one whose block is final
    takes no decision while it waits (its result depends on nothing but its own forwards).
    """

    def __init__(self, decoder: BlockDecoder, batch: CachedBatch | RecomputeBatch) -> None:
        super().__init__(batch)
        self.decoder = decoder
        W, device = decoder.window, batch.device
        # [R, W]: the current block, after the previous one with multi-block editing.
        self.window = torch.zeros((0, W), dtype=torch.long, device=device)
        self.block_start = torch.zeros(0, dtype=torch.long, device=device)  # [R], current block
        # [R]: the window's previous block holds decoded tokens, not final yet (multi-block).
        self.has_prev = torch.zeros(0, dtype=torch.bool, device=device)

    def _join(self, requests: list[Request]) -> list[int]:
        """Whole blocks of the prompts become context; the tail (if any) starts the first block."""
        B, W, device = self.decoder.block_size, self.decoder.window, self.batch.device
        prompts = [r.prompt for r in requests]
        starts = [len(p) // B * B for p in prompts]
        restored = self.batch.add([p[:s] for p, s in zip(prompts, starts, strict=True)], B)
        window = torch.full((len(prompts), W), self.decoder.mask, dtype=torch.long, device=device)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            window[r, W - B : W - B + len(p) - s] = torch.tensor(p[s:], device=device)
        self.window = torch.cat([self.window, window])
        self.block_start = torch.cat([self.block_start, torch.tensor(starts, device=device)])
        none = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.has_prev = torch.cat([self.has_prev, none])
        return restored

    def _select(self, rows: torch.Tensor) -> None:
        self.window, self.block_start = self.window[rows], self.block_start[rows]
        self.has_prev = self.has_prev[rows]

    def _given(self) -> torch.Tensor:
        """Per row, how many positions of its window are not its answer's: its prompt's tail,
        and a previous block it does not have yet."""
        d = self.decoder
        starts = (self.block_start - (d.window - d.block_size)).tolist()
        tails = [max(0, len(r.prompt) - s) for r, s in zip(self.requests, starts, strict=True)]
        return torch.tensor(tails, dtype=torch.long, device=self.batch.device)

    def _queries(
        self, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool | torch.Tensor, torch.Tensor | None]:
        """(ids, positions, clean, present) of a forward over the windows: the current block
        noisy, the previous block (multi-block editing) clean where a row has one; a row that
        has none repeats its current block there (absent queries, see `CachedBatch.forward`)."""
        B, W = self.decoder.block_size, self.decoder.window
        if W == B:
            return self.window, index, False, None
        has = self.has_prev[:, None].expand(-1, B)
        current, current_index = self.window[:, B:], index[:, B:]
        ids = torch.cat([torch.where(has, self.window[:, :B], current), current], 1)
        positions = torch.cat([torch.where(has, index[:, :B], current_index), current_index], 1)
        present = torch.cat([has, torch.ones_like(has)], 1)
        return ids, positions, torch.cat([has, torch.zeros_like(has)], 1), present

    def _advance(self) -> None:
        d, batch = self.decoder, self.batch
        B, W, device = d.block_size, d.window, batch.device
        index = (self.block_start - (W - B))[:, None] + torch.arange(W, device=device)
        given = self._given()
        wanted = given + torch.tensor(
            [r.sampling.max_new_tokens - len(r.out.tokens) for r in self.requests], device=device
        )
        samplings = [r.sampling for r in self.requests]  # this step's rows; some leave
        thresholds = torch.tensor([s.threshold for s in samplings], device=device)
        min_accept = torch.tensor([s.min_accept for s in samplings], device=device)
        eos = torch.tensor([not s.ignore_eos for s in samplings], device=device)
        ltr_rows = [s.order == "left_to_right" for s in samplings]
        in_order_rows = [s.eos_in_order and not s.ignore_eos for s in samplings]
        edit_rows = [s.edits for s in samplings]
        # host lists: no device sync
        any_ltr, any_in_order, any_edit = any(ltr_rows), any(in_order_rows), any(edit_rows)
        ltr = torch.tensor(ltr_rows, device=device)
        in_order = torch.tensor(in_order_rows, device=device)
        editing = torch.tensor(edit_rows, device=device)
        edit_thresholds = torch.tensor([s.edit_threshold or 1.0 for s in samplings], device=device)
        post_cap = torch.tensor([s.max_post_edit_steps for s in samplings], device=device)
        post = torch.zeros_like(post_cap)  # edit-only forwards so far, per row
        quiet = torch.zeros_like(editing)  # the last was one, and it changed nothing
        # Multi-block: the previous block is final once a forward left it as it was (its
        # logits depend on nothing after it). A block only needs the last to be quiet when the
        # answer ends in it; otherwise the next step checks it as the previous block.
        prev_ok = ~self.has_prev
        edits = torch.zeros_like(post_cap)
        position = torch.arange(W, device=device)
        while True:
            open_, decided, ends = d._open(self.window, given, wanted, eos)
            masks_left = open_.any(-1)
            checked = prev_ok & (quiet | (W > B) & ~ends)
            running = masks_left | (editing & ~checked & (post < post_cap))
            if (done := ~running & ends).any():  # complete: leave before the next forward
                for w in done.nonzero().flatten().tolist():
                    self._record(w, int(edits[w]), int(post[w]))
                    d._extend(self.requests[w], self.window[w, int(given[w]) :].tolist())
                keep = (~done).nonzero().flatten()
                self._keep(keep.tolist())
                index, given, wanted, thresholds, min_accept, eos, ltr, in_order = (
                    x[keep]
                    for x in (index, given, wanted, thresholds, min_accept, eos, ltr, in_order)
                )
                editing, edit_thresholds, post_cap, post, quiet, prev_ok, edits = (
                    x[keep]
                    for x in (editing, edit_thresholds, post_cap, post, quiet, prev_ok, edits)
                )
                open_, decided, masks_left, running = (
                    x[keep] for x in (open_, decided, masks_left, running)
                )
            if not running.any():
                break
            active = running.tolist()
            ids, q_index, clean, present = self._queries(index)
            logits = batch.forward(ids, q_index, B, clean=clean, present=present)
            logits[..., d.mask] = float("-inf")  # a mask is never a candidate
            candidates, confidence = choose(
                logits,
                [r.sampling for r in self.requests],
                [r.generator for r in self.requests],
                active,
            )
            sure = confidence.masked_fill(~open_, -1.0)
            accept = (sure > thresholds[:, None]) & open_
            # At least min_accept per row (as many as are open): its most confident.
            need = torch.minimum(min_accept, open_.sum(-1))
            if (short := accept.sum(-1) < need).any():
                ranked = sure.topk(int(need.max()), -1).indices
                wanted_rank = torch.arange(ranked.shape[1], device=device) < need[:, None]
                forced = torch.zeros_like(accept).scatter_(1, ranked, wanted_rank)
                accept |= forced & short[:, None]
            leftmost = open_ & (open_.cumsum(-1) == 1)
            if any_in_order:  # nothing past the predicted end; its EOS only once in order
                eos_here = open_ & (candidates == d.eos)
                end = torch.where(eos_here, position, W).min(-1, keepdim=True).values
                waiting = open_ & ~accept & (position < end)
                ordered = accept & (position <= end) & ~(eos_here & (waiting.cumsum(-1) > 0))
                ordered |= leftmost & ~ordered.any(-1, keepdim=True)  # never nothing
                accept = torch.where(in_order[:, None], ordered, accept)
            if any_ltr:  # those rows take their leftmost open position alone
                accept = torch.where(ltr[:, None], leftmost, accept)
            for r, a in zip(self.requests, active, strict=True):
                r.out.forwards += a
            if any_edit:  # sure it is wrong: replace it, in rows still deciding
                edit = decided & (candidates != self.window)
                edit &= (confidence > edit_thresholds[:, None]) & (editing & running)[:, None]
                if any_in_order:  # no EOS written by an edit while a mask before it is open
                    early = (candidates == d.eos) & (open_.cumsum(-1) > 0)
                    edit &= ~(in_order[:, None] & early)
                accept |= edit
                edits += edit.sum(-1)
                post += running & ~masks_left
                quiet = torch.where(running, ~masks_left & ~edit.any(-1), quiet)
                if W > B:
                    prev_ok = torch.where(running, ~edit[:, : W - B].any(-1), prev_ok)
            self.window = torch.where(accept, candidates, self.window)

        final = W - B  # with multi-block editing only the previous block is final here
        for w, r in enumerate(self.requests):
            self._record(w, int(edits[w]), int(post[w]))
            d._extend(r, self.window[w, int(given[w]) : final or W].tolist())
        keep = [w for w, r in enumerate(self.requests) if not r.out.done]
        self._keep(keep)
        if self.requests:
            if final:  # (a row with no previous block commits nothing: its positions < 0)
                batch.commit(self.window[:, :B], index[keep, :B].clamp(min=0), self.has_prev)
                self.window = torch.cat(
                    [self.window[:, B:], torch.full_like(self.window[:, B:], d.mask)], 1
                )
                self.has_prev = torch.ones_like(self.has_prev)
            else:
                batch.commit(self.window, index[keep])
                self.window = torch.full_like(self.window, d.mask)
            self.block_start = self.block_start + B

    def _record(self, w: int, edits: int, post: int) -> None:
        """Row w's step is done: its edits and edit-only forwards (token editing)."""
        out = self.requests[w].out
        if self.requests[w].sampling.edits:
            out.edits += edits
            out.post_edit_forwards.append(post)
