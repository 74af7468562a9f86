"""Forward process and objectives: properties stated in RECIPE.md, checked numerically."""

from __future__ import annotations

import math

import pytest
import torch

from llada_ray.diffusion.losses import (
    cap_confidence_loss,
    dpo_elbo_loss,
    editing_loss,
    elbo_loss,
    masked_token_nll,
    sequence_elbo,
    token_nll,
)
from llada_ray.diffusion.noise import (
    complementary_pairs,
    embedding_noise_std,
    forward_mask,
    reach_of,
    sample_mask_rates,
    substitute,
)

MASK = 99


def test_mask_rates_respect_bandwidth_and_stratify() -> None:
    gen = torch.Generator().manual_seed(0)
    t = sample_mask_rates(1000, t_min=0.3, t_max=0.8, generator=gen)
    assert t.min() >= 0.3 and t.max() <= 0.8
    strat = sample_mask_rates(8, antithetic=True, t_min=1e-3, generator=gen)
    # One draw in each eighth of [eps, 1].
    bins = ((strat - 1e-3) / (1 - 1e-3) * 8).floor().sort().values
    assert bins.tolist() == list(range(8))
    with pytest.raises(ValueError, match="t_min"):
        sample_mask_rates(4, t_min=0.9, t_max=0.5)


def test_forward_mask_only_touches_maskable_positions_at_rate_t() -> None:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 50, (4, 4000), generator=gen)
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[:, 1000:] = True
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    noised = forward_mask(x0, t, maskable, MASK, gen)
    assert not noised.masked[:, :1000].any()
    assert torch.equal(noised.xt[~noised.masked], x0[~noised.masked])
    assert (noised.xt[noised.masked] == MASK).all()
    rates = noised.masked[:, 1000:].float().mean(-1)
    torch.testing.assert_close(rates, t, atol=0.03, rtol=0)


def test_complementary_pairs_partition_maskable_positions() -> None:
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 50, (3, 64), generator=gen)
    maskable = torch.rand(3, 64, generator=gen) < 0.7
    t = torch.tensor([0.3, 0.5, 0.8])
    pairs = complementary_pairs(x0, t, maskable, MASK, gen)
    first, second = pairs.masked[0::2], pairs.masked[1::2]
    assert not (first & second).any()
    assert torch.equal(first | second, maskable)
    torch.testing.assert_close(pairs.t, torch.tensor([0.3, 0.7, 0.5, 0.5, 0.8, 0.2]))
    assert torch.equal(pairs.xt[0::2][~first], x0[~first])


def _random_batch(seed: int = 3) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 10, 7, generator=gen)
    targets = torch.randint(0, 7, (2, 10), generator=gen)
    masked = torch.rand(2, 10, generator=gen) < 0.5
    return logits, targets, masked


def test_elbo_inverse_t_weighting_scales_as_stated() -> None:
    logits, targets, masked = _random_batch()
    t = torch.tensor([0.5, 0.25])
    uniform = elbo_loss(logits, targets, masked, t, weighting="uniform")
    inv_t = elbo_loss(logits, targets, masked, t, weighting="inv_t")
    torch.testing.assert_close(inv_t.per_sequence, uniform.per_sequence * torch.tensor([2.0, 4.0]))
    # normalisation "maskable": each row's sum over its maskable count (here all 10), mean of rows
    torch.testing.assert_close(inv_t.loss, (inv_t.per_sequence / 10).mean())
    # normalisation "masked": batch sum over masked-token count
    masked_norm = elbo_loss(logits, targets, masked, t, weighting="uniform", normalization="masked")
    torch.testing.assert_close(masked_norm.loss, uniform.per_sequence.sum() / masked.sum())


def test_elbo_matches_cross_entropy_by_hand() -> None:
    logits, targets, masked = _random_batch(4)
    by_hand = torch.zeros(2)
    for b in range(2):
        for i in range(10):
            if masked[b, i]:
                by_hand[b] -= logits[b, i].log_softmax(-1)[targets[b, i]]
    torch.testing.assert_close(masked_token_nll(logits, targets, masked).sum(-1), by_hand)
    torch.testing.assert_close(
        sequence_elbo(logits, targets, masked, torch.tensor([0.5, 1.0])),
        -by_hand / torch.tensor([0.5, 1.0]),
    )


def test_cap_term_is_zero_without_correct_predictions_and_entropy_otherwise() -> None:
    logits, _, masked = _random_batch(5)
    wrong = (logits.argmax(-1) + 1) % 7
    zero = cap_confidence_loss(logits.requires_grad_(), wrong, masked)
    assert zero.item() == 0.0
    zero.backward()  # still differentiable
    right = logits.detach().argmax(-1)
    p = logits.detach().softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    expected = entropy[masked].mean()
    torch.testing.assert_close(cap_confidence_loss(logits.detach(), right, masked), expected)


def test_dpo_elbo_loss_is_log2_when_policy_equals_reference() -> None:
    elbos = torch.tensor([-3.0, -5.0, -1.5])
    other = torch.tensor([-4.0, -2.0, -7.0])
    out = dpo_elbo_loss(elbos, other, elbos, other, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2))
    better = dpo_elbo_loss(elbos + 1, other - 1, elbos, other, beta=0.1)
    assert better.loss.item() < math.log(2)
    assert better.accuracy.item() == 1.0
    assert better.reward_margin.item() == pytest.approx(0.2)


def test_embedding_noise_decays_linearly_to_zero() -> None:
    assert embedding_noise_std(0, 100, 0.5) == 0.5
    assert embedding_noise_std(50, 100, 0.5) == pytest.approx(0.25)
    assert embedding_noise_std(100, 100, 0.5) == embedding_noise_std(7, 0, 0.5) == 0.0


def test_substitution_replaces_only_visible_tokens_at_its_rate_never_with_the_mask() -> None:
    gen = torch.Generator().manual_seed(6)
    xt = torch.randint(0, 50, (2, 5000), generator=gen)
    xt[:, :1000] = MASK  # masked positions are not visible
    visible = xt != MASK
    visible[:, 4000:] = False  # nor are prompts
    out = substitute(xt, visible, 0.2, vocab_size=100, mask_id=MASK, generator=gen)
    assert not out.substituted[~visible].any()
    assert torch.equal(out.xt[~out.substituted], xt[~out.substituted])
    assert (out.xt[out.substituted] != xt[out.substituted]).all()
    assert (out.xt[out.substituted] != MASK).all() and out.xt.max() < 100
    assert out.substituted[visible].float().mean().item() == pytest.approx(0.2 * 0.99, abs=0.02)


def test_editing_loss_is_near_zero_for_an_oracle_and_large_for_a_copier() -> None:
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, 50, (3, 200), generator=gen)
    visible = torch.rand(x0.shape, generator=gen) < 0.6
    edited = substitute(x0, visible, 0.1, vocab_size=50, mask_id=MASK, generator=gen)
    oracle = torch.nn.functional.one_hot(x0, 100).float() * 30
    copier = torch.nn.functional.one_hot(edited.xt, 100).float() * 30
    good = editing_loss(token_nll(oracle, x0), visible, edited.substituted)
    bad = editing_loss(token_nll(copier, x0), visible, edited.substituted)
    assert good.loss < 1e-6 and good.substituted < 1e-6
    assert bad.substituted == pytest.approx(30.0, rel=1e-4) and bad.kept < 1e-6
    # Over every visible position: the share replaced times the cost of each.
    share = edited.substituted.sum() / visible.sum()
    assert bad.loss.item() == pytest.approx(30.0 * share.item(), rel=1e-4)


def test_in_sequence_substitution_shows_a_block_only_tokens_it_sees_anyway() -> None:
    """Each replacement is a token of its own document up to its own block's end (earlier
    blocks reach a block through the clean half, whole; its own block as it is), never a mask:
    no substitution leaks a later block's or another document's token."""
    gen = torch.Generator().manual_seed(8)
    B, L = 8, 64
    doc = (torch.arange(L) >= 40).long().expand(3, L)  # documents [0, 40) and [40, 64)
    xt = torch.arange(L).expand(3, L).clone()  # a token names its position
    xt[torch.rand(3, L, generator=gen) < 0.4] = MASK
    visible = xt != MASK
    out = substitute(xt, visible, 0.9, vocab_size=100, mask_id=MASK, generator=gen,
                     reach=reach_of(doc, B))  # fmt: skip
    at = out.substituted.nonzero().tolist()
    assert len(at) > 40
    for row, i in at:
        j = int(out.xt[row, i])  # the position the replacement came from
        first = 0 if i < 40 else 40
        end = min(40 if i < 40 else L, (i // B + 1) * B)
        assert first <= j < end and j != i and xt[row, j] == j
    assert not out.substituted[~visible].any()
