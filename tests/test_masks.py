"""The attention rule against a brute-force table, and every execution path against each other."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llada_ray.diffusion.masks import (
    TiledPlan,
    block_diffusion_layout,
    causal_layout,
    position_ids_for,
    stable_layout,
)
from llada_ray.diffusion.schedule import check_block_size
from llada_ray.model.attention import MaskedAttention


def brute_force_bd(doc: list[int], block: int) -> torch.Tensor:
    """RECIPE.md §2, written out token by token over [xt ; x0]."""
    n = len(doc)
    out = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(2 * n):
        for j in range(2 * n):
            qi, kj = i % n, j % n
            if doc[qi] != doc[kj]:
                continue
            q_noisy, k_noisy = i < n, j < n
            qb, kb = qi // block, kj // block
            if q_noisy and k_noisy:
                out[i, j] = qb == kb
            elif q_noisy:
                out[i, j] = kb < qb
            elif not k_noisy:
                out[i, j] = kb <= qb
    return out


@st.composite
def packs(draw: st.DrawFn) -> tuple[list[int], int]:
    blocks = draw(st.integers(1, 6))
    block = draw(st.sampled_from([1, 2, 3, 4, 8]))
    n = blocks * block
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=4)))
    doc, current = [], 0
    for p in range(n):
        if cuts and p == cuts[0]:
            cuts.pop(0)
            current += 1
        doc.append(current)
    if draw(st.booleans()):  # the packer's trailing padding is a document of its own
        block_doc = [*doc[: n - 1], current + 1] if n > 1 else doc
        doc = block_doc
    return doc, block


def test_recipe_example_table() -> None:
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    got = block_diffusion_layout(torch.zeros(1, 4, dtype=torch.long), 2).dense()[0, 0]
    assert torch.equal(got, expected)


@settings(max_examples=150, deadline=None)
@given(packs())
def test_bd_mask_matches_brute_force(pack: tuple[list[int], int]) -> None:
    doc, block = pack
    got = block_diffusion_layout(torch.tensor([doc]), block).dense()[0, 0]
    assert torch.equal(got, brute_force_bd(doc, block))


@settings(max_examples=60, deadline=None)
@given(packs())
def test_stable_and_causal_masks_match_brute_force(pack: tuple[list[int], int]) -> None:
    doc, _ = pack
    d = torch.tensor(doc)
    same_doc = d[:, None] == d[None, :]
    assert torch.equal(stable_layout(d[None]).dense()[0, 0], same_doc)
    causal = torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    assert torch.equal(causal_layout(d[None]).dense()[0, 0], same_doc & causal)


def test_block_size_must_divide_sequence() -> None:
    with pytest.raises(ValueError, match="does not divide sequence length 12"):
        block_diffusion_layout(torch.zeros(1, 12, dtype=torch.long), 8)
    check_block_size(4, 12)


def test_position_ids_restart_per_document() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert position_ids_for(doc, True).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    assert position_ids_for(doc, False).tolist() == [list(range(6))] * 2


def random_docs(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    cuts = torch.rand(batch, n, generator=gen) < 0.05
    cuts[:, 0] = False
    return cuts.cumsum(-1)


@pytest.mark.parametrize("mode", ["bd", "stable", "causal"])
@pytest.mark.parametrize("tile", [8, 16, 48, 128])
def test_all_paths_agree_forward_and_backward(mode: str, tile: int) -> None:
    gen = torch.Generator().manual_seed(tile)
    docs = random_docs(2, 96, gen)
    layout = {
        "bd": lambda: block_diffusion_layout(docs, 16),
        "stable": lambda: stable_layout(docs),
        "causal": lambda: causal_layout(docs),
    }[mode]()
    n = len(layout.queries)
    q = torch.randn(2, 4, n, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, n, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, n, 16, generator=gen, dtype=torch.float64)
    results = {}
    for backend in ["eager", "dense", "block_sparse"]:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = MaskedAttention(layout, backend, tile)(*leaves, None, 0)
        out.pow(2).sum().backward()
        results[backend] = (out.detach(), [x.grad for x in leaves])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused; it is the CPU check
        flex = MaskedAttention(layout, "flex", tile)(q.float(), k.float(), v.float(), None, 0)
    ref_out, ref_grads = results["eager"]
    for backend in ["dense", "block_sparse"]:
        out, grads = results[backend]
        torch.testing.assert_close(out, ref_out)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref)
    torch.testing.assert_close(flex, ref_out.float(), atol=1e-5, rtol=1e-4)


def test_tiled_plan_skips_unreachable_keys() -> None:
    docs = torch.zeros(1, 256, dtype=torch.long)
    plan = block_diffusion_layout(docs, 32).tiled(64)
    assert isinstance(plan, TiledPlan)
    # Of 8 x 8 tiles, noisy tile i reaches clean tiles 0..i and itself, clean tile i clean tiles
    # 0..i: 24 of 64 (tends to 1/4 as L grows).
    assert plan.density() == 24 / 64
    packed = torch.arange(256).div(64, rounding_mode="floor")[None]
    assert block_diffusion_layout(packed, 32).tiled(64).density() < plan.density()
