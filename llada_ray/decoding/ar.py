"""The autoregressive baseline: next-token decoding of the pre-conversion model over the same
forward path, KV cache and batch machinery as the block decoder (a causal layout is the clean
stream at block size 1), so a speed ratio between the two measures the algorithm, not the harness.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from llada_ray.decoding.batch import Decoder, StopCheck
from llada_ray.decoding.sampling import Generation, Sampling, choose


class ARDecoder(Decoder):
    """Greedy or sampled next-token decoding: one query per step, kept as context."""

    def step_shapes(self) -> list[tuple[int, int, int]]:
        return [(1, 1, 1)]

    @torch.no_grad()
    def stream(
        self,
        prompts: list[list[int]],
        sampling: Sampling | list[Sampling],
        seeds: list[int | None] | None = None,
        stop: StopCheck | None = None,
    ) -> Iterator[list[Generation]]:
        """Yields every request's Generation (growing in place) after each token."""
        started = time.perf_counter()
        samplings, generators, out = self._start(prompts, sampling, seeds)
        R = len(prompts)
        batch = self._batch(R)
        device = batch.device
        # The prompt but its last token is context; the last one is the first step's query.
        batch.prefill([p[:-1] for p in prompts], 1)
        ids = torch.tensor([[p[-1]] for p in prompts], device=device)
        index = torch.tensor([[len(p) - 1] for p in prompts], device=device)
        alive = list(range(R))
        while alive:
            logits = batch.forward(ids, index, 1, clean=True, keep=True)
            logits[..., self.mask] = float("-inf")
            tokens, _ = choose(
                logits,
                [samplings[r] for r in alive],
                [generators[r] for r in alive],
                [True] * len(alive),
            )
            now = time.perf_counter() - started
            for w, r in enumerate(alive):
                out[r].forwards += 1
                check = None if stop is None else (lambda r=r: stop(r, out[r].tokens))
                self._extend(out[r], [int(tokens[w, 0])], samplings[r], check, now)
            yield out
            keep = [w for w, r in enumerate(alive) if not out[r].done]
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            if len(keep) < len(alive):
                batch.select(rows)
                alive = [alive[w] for w in keep]
            ids, index = tokens[rows], index[rows] + 1
