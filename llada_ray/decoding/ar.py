"""The autoregressive baseline: next-token decoding of the pre-conversion model over the same
forward path, KV cache and batch machinery as the block decoder (a causal layout is the clean
stream at block size 1), so a speed ratio between the two measures the algorithm, not the harness.
"""

from __future__ import annotations

import torch

from llada_ray.decoding.batch import CachedBatch, Decoder, RecomputeBatch, Request, Run
from llada_ray.decoding.sampling import choose


class ARDecoder(Decoder):
    """Greedy or sampled next-token decoding: one query per step, kept as context."""

    def step_shapes(self) -> list[tuple[int, int, int]]:
        return [(1, 1, 1)]

    def open(self) -> ARRun:
        return ARRun(self, self._batch())


class ARRun(Run):
    """A running batch of next-token decodes: a step is one token for every request; requests
    join at any step (their prompt but its last token prefilled, the last token their first
    query)."""

    def __init__(self, decoder: ARDecoder, batch: CachedBatch | RecomputeBatch) -> None:
        super().__init__(batch)
        self.decoder = decoder
        self.ids = torch.zeros((0, 1), dtype=torch.long, device=batch.device)  # [R, 1] queries
        self.index = torch.zeros_like(self.ids)  # their positions

    def _join(self, requests: list[Request]) -> list[int]:
        device = self.batch.device
        restored = self.batch.add([r.prompt[:-1] for r in requests], 1)
        ids = torch.tensor([[r.prompt[-1]] for r in requests], device=device)
        index = torch.tensor([[len(r.prompt) - 1] for r in requests], device=device)
        self.ids, self.index = torch.cat([self.ids, ids]), torch.cat([self.index, index])
        return restored

    def _select(self, rows: torch.Tensor) -> None:
        self.ids, self.index = self.ids[rows], self.index[rows]

    def _advance(self) -> None:
        logits = self.batch.forward(self.ids, self.index, 1, clean=True, keep=True)
        logits[..., self.decoder.mask] = float("-inf")
        tokens, _ = choose(
            logits,
            [r.sampling for r in self.requests],
            [r.generator for r in self.requests],
            [True] * len(self.requests),
        )
        for w, r in enumerate(self.requests):
            r.out.forwards += 1
            self.decoder._extend(r, [int(tokens[w, 0])])
        self.ids, self.index = tokens, self.index + 1
        self._keep([w for w, r in enumerate(self.requests) if not r.out.done])
