"""Per-request sampling settings and the draw of candidate tokens. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class Sampling:
    """What one request asks for. Block size is not here: it is the model's (set at training)."""

    threshold: float = 0.95  # τ: accept every masked position more confident than this
    min_accept: int = 1  # per step, at least this many (the most confident)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    ignore_eos: bool = False  # decode max_new_tokens whatever comes (benchmarks: fixed lengths)
    # Block decoding: "left_to_right" takes one position per forward, the leftmost open one,
    # whatever τ says: semi-autoregressive order, which separates decoding order from the model.
    order: Literal["confidence", "left_to_right"] = "confidence"
    # Block decoding: no position after the leftmost open one whose candidate is EOS (the answer's
    # predicted end) is accepted, and that EOS only with every open position before it: no
    # forward is paid for text past where the model believes the answer ends. It takes
    # precedence over min_accept (at least one position is always accepted).
    eos_in_order: bool = False
    # Token editing (LLaDA2.1, block decoding): τ_edit, or None for none. Each forward also
    # replaces every decided answer token of the block whose prediction differs from it with
    # probability above τ_edit; a block is final once an edit-only forward (no mask left)
    # changes nothing, or after `max_post_edit_steps` of them (with multi-block editing, once
    # a forward of the next block leaves it as it was; see decoding/block.py).
    edit_threshold: float | None = None
    max_post_edit_steps: int = 16

    def __post_init__(self) -> None:
        # A bad setting would loop forever (min_accept 0) or divide by zero: refuse it here.
        if not (0 < self.threshold <= 1 and self.min_accept >= 1 and self.max_new_tokens >= 1):
            raise ValueError(f"bad sampling settings: {self}")
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ValueError(f"bad sampling settings: {self}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"bad sampling settings: {self}")
        if self.order not in ("confidence", "left_to_right"):
            raise ValueError(f"bad sampling settings: {self}")
        if self.edit_threshold is not None and not 0 < self.edit_threshold <= 1:
            raise ValueError(f"bad sampling settings: {self}")
        if self.max_post_edit_steps < 0:
            raise ValueError(f"bad sampling settings: {self}")

    @property
    def edits(self) -> bool:
        return self.edit_threshold is not None


@dataclass
class Generation:
    """One request's output, growing while it decodes."""

    tokens: list[int] = field(default_factory=list)
    forwards: int = 0  # model calls this request took part in (cache writes ride along)
    # When done: "stop" (EOS or a stop condition), "length", or "cancelled" (by its caller).
    finish_reason: str | None = None
    seconds: float = 0.0  # wall time from joining a batch until this request finished
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # Block decoding: tokens decided after the answer's end (past an EOS committed later, to
    # their left): work that never reached the output, a whole forward where nothing else was
    # decided in it.
    discarded: int = 0
    # Token editing: decided tokens replaced by a later forward, and per step (a block's masks
    # decoded; with multi-block editing the previous block checked along) the edit-only
    # forwards it took after the last mask (the confirming one included).
    edits: int = 0
    post_edit_forwards: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0


def repeated_ngrams(tokens: list[int], n: int = 3, ignore: int | None = None) -> tuple[int, int]:
    """(repeats, n-grams) of one answer (`ignore`: a token left out, its EOS): the n-grams that
    occurred earlier in it, and all of them. Their ratio is the stutter a low threshold can cause
    (LLaDA2.1's Speed mode); it belongs beside every tokens-per-forward figure."""
    tokens = [t for t in tokens if t != ignore]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def filtered(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one request's logits [..., V]."""
    logits = logits / s.temperature
    if s.top_k is not None:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the first token that passes p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose(
    logits: torch.Tensor,
    samplings: list[Sampling],
    generators: list[torch.Generator | None],
    active: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token and its probability at every position: logits [R, n, V] → [R, n] each.

    Consumes `logits` (overwritten). Greedy rows take the argmax, whose probability is
    1 / Σ exp(l − max): computed in place, with no softmax copy of the [R, n, V] logits.
    Sampling rows draw from their own generator, and only while `active` (they still have
    something to decide), so a request's draws depend on nothing but its seed and its own steps,
    never on the other requests of its batch.
    """
    logits = logits.float()  # a no-op for float32 logits
    drawn = {}
    for r, s in enumerate(samplings):  # first: they read the logits before they are overwritten
        if s.temperature > 0 and active[r]:
            probs = filtered(logits[r], s).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generators[r])
            drawn[r] = (token.squeeze(-1), probs.gather(-1, token).squeeze(-1))
    top, tokens = logits.max(-1)
    confidence = logits.sub_(top[..., None]).exp_().sum(-1).reciprocal_()
    for r, (token, p) in drawn.items():
        tokens[r], confidence[r] = token, p
    return tokens, confidence
