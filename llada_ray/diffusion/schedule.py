"""The Warmup-Stable-Decay block-size schedule of continual pre-training (RECIPE.md §3).

Warmup grows the block size from 1 (the AR model read as a block-diffusion model) to the
sequence length; the stable phase trains plain MDLM at block = sequence length without the clean
half; decay shrinks the block size step by step to the size used at inference. The phases are
data (config); this module checks their shape and says how each one runs. Pure Python: the
config imports it, and must stay light for Ray Data workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PhaseKind = Literal["warmup", "stable", "decay"]


def check_block_size(block_size: int, seq_len: int) -> None:
    if block_size < 1 or seq_len % block_size:
        raise ValueError(
            f"block size {block_size} does not divide sequence length {seq_len}: blocks are "
            "aligned to absolute positions, so L must be a multiple of the block size"
        )


@dataclass(frozen=True)
class Phase:
    name: str
    block_size: int
    tokens: int
    lr: float
    kind: PhaseKind


def plan_phases(phases: list[tuple[str, int, int, float]], seq_len: int) -> list[Phase]:
    """Label (name, block_size, tokens, lr) tuples as warmup / stable / decay, or refuse them.

    Accepted shape: block sizes non-decreasing up to the stable phase(s) at block = seq_len, then
    non-increasing. Every block size must divide seq_len (blocks align to absolute positions).
    A schedule without a stable phase is allowed (e.g. a short warmup-only conversion test).
    """
    if not phases:
        raise ValueError("the CPT schedule has no phases")
    sizes = [size for _, size, _, _ in phases]
    for name, size, tokens, lr in phases:
        try:
            check_block_size(size, seq_len)
        except ValueError as err:
            raise ValueError(f"phase {name!r}: {err}") from None
        if tokens <= 0 or lr <= 0:
            raise ValueError(f"phase {name!r}: tokens and lr must be positive")
    peak = sizes.index(max(sizes))
    rising, falling = sizes[: peak + 1], sizes[peak:]
    if rising != sorted(rising) or falling != sorted(falling, reverse=True):
        raise ValueError(
            f"block sizes {sizes} must rise (warmup), hold (stable), then fall (decay)"
        )
    planned = []
    for i, (name, size, tokens, lr) in enumerate(phases):
        kind: PhaseKind = "stable" if size == seq_len else ("warmup" if i <= peak else "decay")
        planned.append(Phase(name, size, tokens, lr, kind))
    return planned
