"""The forward (noising) process of masked diffusion: mask rates, masking, complementary pairs.

The schedule is linear: each maskable token becomes the mask token independently with
probability t (keep probability alpha_t = 1 - t). t is drawn per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sample_mask_rates(
    batch_size: int,
    *,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t in [t_min, t_max] per sequence, shape [batch_size].

    Pre-training uses t_min = eps = 1e-3, t_max = 1 (LLaDA); post-training a bandwidth such as
    [0.3, 0.8] (dFactory). `antithetic` stratifies u over the batch, u_i = (i + u0) / n, so the
    batch covers [0, 1) evenly; this lowers the variance of the ELBO estimate (MDLM, BD3-LM).
    """
    if not 0.0 < t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 < t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if antithetic:
        u0 = torch.rand((), generator=generator, device=device)
        u = (torch.arange(batch_size, device=device) + u0) / batch_size
        u = u[torch.randperm(batch_size, generator=generator, device=device)]
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
    return t_min + (t_max - t_min) * u


@dataclass(frozen=True)
class Noised:
    """A noised batch: xt (input), the masked positions, and the rate t of each row."""

    xt: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor


def forward_mask(
    x0: torch.Tensor,
    t: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> Noised:
    """Mask each maskable token of x0 [batch, L] independently with probability t [batch]."""
    draw = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (draw < t[:, None]) & maskable
    return Noised(torch.where(masked, mask_id, x0), masked, t)


def complementary_pairs(
    x0: torch.Tensor,
    t: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> Noised:
    """From each row make two rows: masked at rate t, and its complement over maskable tokens.

    Output rows are [row_0, complement_0, row_1, complement_1, ...] so both halves of a pair
    always land in the same micro-batch; every maskable token is masked in exactly one of them.
    The complement's rate is 1 - t.
    """
    first = forward_mask(x0, t, maskable, mask_id, generator)
    second_masked = maskable & ~first.masked
    pairs_masked = torch.stack([first.masked, second_masked], 1).flatten(0, 1)
    x0_pairs = x0.repeat_interleave(2, 0)
    t_pairs = torch.stack([t, 1.0 - t], 1).flatten()
    return Noised(torch.where(pairs_masked, mask_id, x0_pairs), pairs_masked, t_pairs)


@dataclass(frozen=True)
class Substituted:
    """An editing-stream input: xt with some visible tokens replaced, and where."""

    xt: torch.Tensor
    substituted: torch.Tensor


SUBSTITUTION_TRIES = 4  # in-sequence draws per position before it is left as it is


def substitute(
    xt: torch.Tensor,
    visible: torch.Tensor,
    rate: float,
    vocab_size: int,
    mask_id: int,
    generator: torch.Generator | None = None,
    reach: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Substituted:
    """LLaDA2.1's T2T corruption: each `visible` token of xt [batch, L] becomes, with
    probability `rate`, a random token (a draw equal to the token it replaces changes nothing
    and is not counted).

    The draw is uniform over the vocabulary other than the mask token, or with `reach`
    (first, end) [batch, L] a token of xt itself at a uniformly drawn position in [first, end)
    that is not a mask (a few tries; a position whose tries all hit masks is left): a token
    that belongs in the text, the kind of mistake a decoder makes (a digit out of place, an
    early EOS), where a random one from the whole vocabulary is mostly out of place on its
    face and teaches little more than to spot it. `reach_of` gives each position the range its
    own block can see, so no substitution shows a block a token it could not see anyway."""
    draw = torch.rand(xt.shape, generator=generator, device=xt.device)
    if reach is None:
        pick = torch.randint(vocab_size - 1, xt.shape, generator=generator, device=xt.device)
        random_tokens = pick + (pick >= mask_id).long()  # skips the mask id
    else:
        first, end = reach
        shape = (SUBSTITUTION_TRIES, *xt.shape)
        u = torch.rand(shape, generator=generator, device=xt.device)
        at = (first + (u * (end - first)).long()).clamp(max=xt.shape[1] - 1)
        tries = torch.stack([xt.gather(1, a) for a in at])  # [tries, batch, L]
        token = tries != mask_id
        pick = token.int().argmax(0, keepdim=True)  # the first try that found a token
        random_tokens = tries.gather(0, pick)[0]
        visible = visible & token.any(0)
    substituted = (draw < rate) & visible & (random_tokens != xt)
    return Substituted(torch.where(substituted, random_tokens, xt), substituted)


def reach_of(doc_ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, end) [batch, L]: each position's document up to its block's end, the tokens its
    block sees in block-diffusion training (earlier blocks through the clean half, which holds
    every one of them, and its own block as it is)."""
    L = doc_ids.shape[1]
    position = torch.arange(L, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, position, 0).cummax(-1).values
    last = torch.ones_like(starts)
    last[:, :-1] = starts[:, 1:]
    doc_end = torch.where(last, position + 1, L).flip(-1).cummin(-1).values.flip(-1)
    return first, torch.minimum(doc_end, (position // block_size + 1) * block_size)


def embedding_noise_std(step: int, steps: int, base_std: float) -> float:
    """σ of the masked-embedding noise at `step`: base_std decayed linearly to 0 over `steps`.

    The AR model never trained the mask token, so its embedding is near zero; noise on the
    embedding output at masked positions keeps early CPT gradients healthy (report §7.1).
    """
    if steps <= 0 or step >= steps:
        return 0.0
    return base_std * (1.0 - step / steps)
