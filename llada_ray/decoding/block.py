"""Block-diffusion decoding with an exact prefix KV cache (RECIPE.md §5). Pure torch.

Blocks are aligned to absolute positions: the first block a request decodes may hold the tail of
its prompt. Per block: fill the rest with mask tokens, run the model on the block against the KV
cache of every earlier position, accept every masked position whose confidence exceeds τ (at
least `min_accept`, the most confident), repeat until the block has no mask, then write the
block's KV into the cache with one forward of the finished block as clean tokens. Attention of
committed tokens is block-causal (as in training's clean half), so the cache is exact: decoding
with it gives the tokens of decoding without it.

Requests of different lengths decode together: each row's cached prefix is left-padded to the
longest; padding is a document of its own (it attends only to padding, so it never produces NaN,
and no real token attends to it), so a row decodes as it would alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llada_ray.diffusion.masks import AttentionLayout, Tokens
from llada_ray.model.adapter import DiffusionLM

PAD_DOC, REAL_DOC = -1, 0


@dataclass(frozen=True)
class Sampling:
    block_size: int = 32
    threshold: float = 0.95  # τ: accept every masked position more confident than this
    min_accept: int = 1  # per step, at least this many (the most confident)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    forwards: int = 0  # model calls that produced this request's tokens (incl. cache writes)
    finish_reason: str = "length"  # "stop" (EOS) or "length"
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.forwards, 1)


def _choose(
    logits: torch.Tensor,
    sampling: Sampling,
    generators: list[torch.Generator | None],
    active: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token and its probability at every position: logits [R, B, V] → [R, B] each.

    Only active rows draw from their generator, so a request's draws do not depend on how long
    the other requests of its batch take.
    """
    logits = logits.float()
    if sampling.temperature == 0:
        probs = logits.softmax(-1)
        confidence, tokens = probs.max(-1)
        return tokens, confidence
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(sampling.top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p  # keep the first over p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    tokens = probs.argmax(-1)
    for r, gen in enumerate(generators):
        if active[r]:
            tokens[r] = torch.multinomial(probs[r], 1, generator=gen).squeeze(-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


class BlockDecoder:
    """Decodes a batch of prompts with a DiffusionLM; `use_cache=False` recomputes the prefix at
    every step (the reference the cache must match, and the benchmark's no-cache baseline)."""

    def __init__(self, dlm: DiffusionLM, eos_token_id: int, use_cache: bool = True) -> None:
        self.dlm, self.eos, self.use_cache = dlm.eval(), eos_token_id, use_cache
        self.mask = dlm.mask_token_id

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        seeds: list[int] | None = None,
    ) -> list[Generation]:
        started = time.perf_counter()
        B, R = sampling.block_size, len(prompts)
        device = next(self.dlm.parameters()).device
        generators: list[torch.Generator | None] = (
            [torch.Generator(device).manual_seed(s) for s in seeds] if seeds else [None] * R
        )
        out = [Generation() for _ in prompts]
        # Row r: committed tokens [0, start_r) (KV cached), then its current block from start_r.
        starts = [len(p) // B * B for p in prompts]
        width = max(starts)
        prefix_ids = torch.full((R, width), self.eos, dtype=torch.long, device=device)
        prefix_index = torch.zeros((R, width), dtype=torch.long, device=device)
        prefix_doc = torch.full((R, width), PAD_DOC, dtype=torch.long, device=device)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            prefix_ids[r, width - s :] = torch.tensor(p[:s], device=device)
            prefix_index[r, width - s :] = torch.arange(s, device=device)
            prefix_doc[r, width - s :] = REAL_DOC
        cache = DynamicCache() if self.use_cache else None
        if cache is not None and width:
            self._forward(prefix_ids, prefix_index, prefix_doc, None, B, cache, clean=True)
        blocks = torch.full((R, B), self.mask, dtype=torch.long, device=device)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            blocks[r, : len(p) - s] = torch.tensor(p[s:], device=device)
        block_start = torch.tensor(starts, device=device)
        done = [False] * R

        while not all(done):
            index = block_start[:, None] + torch.arange(B, device=device)
            while True:
                masked = (blocks == self.mask) & ~torch.tensor(done, device=device)[:, None]
                if not masked.any():
                    break
                context = (prefix_ids, prefix_index, prefix_doc)
                logits = self._forward(blocks, index, None, context, B, cache, clean=False)
                logits[..., self.mask] = float("-inf")  # a mask is never a candidate
                active = masked.any(-1).tolist()
                candidates, confidence = _choose(logits, sampling, generators, active)
                confidence = confidence.masked_fill(~masked, -1.0)
                accept = (confidence > sampling.threshold) & masked
                for r in range(R):
                    if done[r] or not masked[r].any():
                        continue
                    out[r].forwards += 1
                    need = min(sampling.min_accept, int(masked[r].sum()))
                    if int(accept[r].sum()) < need:
                        accept[r, confidence[r].topk(need).indices] = True
                blocks = torch.where(accept, candidates, blocks)
            for r in range(R):
                if done[r]:
                    continue
                given = max(0, len(prompts[r]) - int(block_start[r]))
                new = blocks[r, given:].tolist()
                room = sampling.max_new_tokens - len(out[r].tokens)
                if self.eos in new[:room]:
                    out[r].tokens += new[: new.index(self.eos) + 1]
                    out[r].finish_reason, done[r] = "stop", True
                else:
                    out[r].tokens += new[:room]
                    done[r] = len(out[r].tokens) >= sampling.max_new_tokens
            if all(done):
                break
            # Commit the finished block: its KV as clean tokens (block-causal), then move on.
            block_doc = torch.full_like(blocks, REAL_DOC)
            if cache is not None:
                context = (prefix_ids, prefix_index, prefix_doc)
                self._forward(blocks, index, block_doc, context, B, cache, clean=True, keep=True)
                for r in range(R):
                    out[r].forwards += not done[r]
            prefix_ids = torch.cat([prefix_ids, blocks], 1)
            prefix_index = torch.cat([prefix_index, index], 1)
            prefix_doc = torch.cat([prefix_doc, block_doc], 1)
            block_start = block_start + B
            blocks = torch.full_like(blocks, self.mask)
        seconds = time.perf_counter() - started
        for g in out:
            g.seconds = seconds
        return out

    def _forward(
        self,
        ids: torch.Tensor,
        index: torch.Tensor,
        doc: torch.Tensor | None,
        context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        block_size: int,
        cache: DynamicCache | None,
        *,
        clean: bool,
        keep: bool = False,
    ) -> torch.Tensor:
        """Logits of `ids` at absolute positions `index`, attending to the context (the cached
        committed tokens, or the same tokens recomputed when there is no cache).

        The inputs are appended to the cache; unless `keep` (or they are the first entries) they
        are cropped off again afterwards: a block under denoising changes every step.
        """
        doc = torch.full_like(ids, REAL_DOC) if doc is None else doc
        queries = Tokens(index, torch.full_like(ids, clean, dtype=torch.bool), doc)
        if context is None:  # the prefill
            keys, inputs, positions = queries, ids, index
        else:
            c_ids, c_index, c_doc = context
            past = Tokens(c_index, torch.ones_like(c_ids, dtype=torch.bool), c_doc)
            keys = past.cat(queries)
            if cache is None:  # recompute the committed prefix, clean and block-causal
                queries = keys
                inputs, positions = torch.cat([c_ids, ids], 1), torch.cat([c_index, index], 1)
            else:
                inputs, positions = ids, index
        layout = AttentionLayout(queries, keys, block_size)
        before = cache.get_seq_length() if cache is not None else 0
        logits = self.dlm(inputs, layout, positions, cache=cache)
        if cache is not None and context is not None and not keep:
            cache.crop(before - cache.get_seq_length())  # a negative count: tokens to drop
        return logits[:, -ids.shape[1] :]
