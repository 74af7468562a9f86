"""The block-diffusion attention rule, and the three ways we execute it.

One rule decides whether query token q may attend to key token k. Every token carries
  - `index`: its absolute position inside the packed row (blocks are cut on this, from 0),
  - `clean`: whether it is a clean (x0) token or a noisy (xt) one,
  - `doc`:   the id of the document it belongs to.
The rule (RECIPE.md §2), for block b(·) = index // block_size:
  noisy q, noisy k: same block           (block-diagonal)
  noisy q, clean k: b(k) <  b(q)         (clean context strictly before)
  clean q, clean k: b(k) <= b(q)         (block-causal, as inference builds the KV cache)
  clean q, noisy k: never
and always: same document.

The same rule, applied to different token sets, covers every mode we run:
  - BD training: [xt ; x0], both halves indexed 0..L-1;
  - the stable phase: xt alone with block_size = L (bidirectional within a document);
  - AR training / the AR baseline: x alone, all clean, block_size = 1 (token-causal);
  - decoding: a clean prefix in the KV cache plus one noisy block as queries.

Executions, all derived from `allowed`:
  - `dense_mask`: a boolean [batch, 1, q, k] mask for SDPA (and the unfused reference);
  - `flex_block_mask`: a FlexAttention BlockMask whose mask_mod is `allowed` (GPU training,
    inference); FlexAttention stores partially-masked tiles with the mask_mod, so it stays exact
    for any tile size, even tiles larger than the diffusion block;
  - `TiledPlan`: block-sparse SDPA for CPU training (FlexAttention has no CPU backward in torch
    2.13): queries are cut into tiles, each tile attends with fused SDPA to only the key tiles the
    rule lets any of its queries see, under the rule's own sub-mask, so it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llada_ray.diffusion.schedule import check_block_size

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


@dataclass(frozen=True)
class Tokens:
    """Per-token attributes of one side (queries or keys) of attention; each is [batch, n]."""

    index: torch.Tensor
    clean: torch.Tensor
    doc: torch.Tensor

    def __len__(self) -> int:
        return self.index.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    def cat(self, other: Tokens) -> Tokens:
        return Tokens(
            torch.cat([self.index, other.index], -1),
            torch.cat([self.clean, other.clean], -1),
            torch.cat([self.doc, other.doc], -1),
        )


def allowed(
    q_index: torch.Tensor,
    q_clean: torch.Tensor,
    q_doc: torch.Tensor,
    k_index: torch.Tensor,
    k_clean: torch.Tensor,
    k_doc: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """The rule. Pure elementwise tensor ops, so it broadcasts (dense masks) and traces (flex)."""
    q_block = q_index // block_size
    k_block = k_index // block_size
    noisy_noisy = ~q_clean & ~k_clean & (q_block == k_block)
    noisy_clean = ~q_clean & k_clean & (k_block < q_block)
    clean_clean = q_clean & k_clean & (k_block <= q_block)
    return (noisy_noisy | noisy_clean | clean_clean) & (q_doc == k_doc)


@dataclass(frozen=True)
class AttentionLayout:
    """Who may attend to whom in one forward pass: query tokens, key tokens, block size."""

    queries: Tokens
    keys: Tokens
    block_size: int

    def dense(self) -> torch.Tensor:
        """Boolean mask [batch, 1, n_q, n_k], True where attention is allowed."""
        q, k = self.queries, self.keys
        mask = allowed(
            q.index[:, :, None],
            q.clean[:, :, None],
            q.doc[:, :, None],
            k.index[:, None, :],
            k.clean[:, None, :],
            k.doc[:, None, :],
            self.block_size,
        )
        return mask[:, None]

    def flex_block_mask(self, tile_size: int = 128) -> BlockMask:
        from torch.nn.attention.flex_attention import create_block_mask

        q, k, bs = self.queries, self.keys, self.block_size

        def mask_mod(b, h, qi, ki):
            return allowed(
                q.index[b, qi],
                q.clean[b, qi],
                q.doc[b, qi],
                k.index[b, ki],
                k.clean[b, ki],
                k.doc[b, ki],
                bs,
            )

        return create_block_mask(
            mask_mod,
            q.batch_size,
            None,
            len(q),
            len(k),
            device=q.index.device,
            BLOCK_SIZE=tile_size,
        )

    def tiled(self, tile_size: int) -> TiledPlan:
        return TiledPlan.build(self.dense(), tile_size)


def _as_tokens(index: torch.Tensor, clean: bool, doc: torch.Tensor) -> Tokens:
    return Tokens(index, torch.full_like(index, clean, dtype=torch.bool), doc)


def _row_index(doc_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)


def block_diffusion_layout(doc_ids: torch.Tensor, block_size: int) -> AttentionLayout:
    """BD training over the input [xt ; x0] (length 2L) of rows with document ids [batch, L]."""
    seq_len = doc_ids.shape[-1]
    check_block_size(block_size, seq_len)
    index = _row_index(doc_ids)
    tokens = _as_tokens(index, False, doc_ids).cat(_as_tokens(index, True, doc_ids))
    return AttentionLayout(tokens, tokens, block_size)


def stable_layout(doc_ids: torch.Tensor) -> AttentionLayout:
    """The stable phase (block = sequence): xt alone, bidirectional within each document."""
    tokens = _as_tokens(_row_index(doc_ids), False, doc_ids)
    return AttentionLayout(tokens, tokens, doc_ids.shape[-1])


def causal_layout(doc_ids: torch.Tensor) -> AttentionLayout:
    """Autoregressive attention (all clean, block 1), still confined to each document."""
    tokens = _as_tokens(_row_index(doc_ids), True, doc_ids)
    return AttentionLayout(tokens, tokens, 1)


def position_ids_for(doc_ids: torch.Tensor, restart_per_document: bool) -> torch.Tensor:
    """RoPE positions [batch, L]: 0.. per document when restarting, else 0..L-1 per row.

    Documents are contiguous runs of equal doc ids; a new run starts wherever the id changes.
    """
    index = _row_index(doc_ids)
    if not restart_per_document:
        return index.clone()
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    return index - run_start


@dataclass(frozen=True)
class Tile:
    """One query tile of a TiledPlan: its rows, the key ranges it reaches, and its mask there."""

    rows: slice
    key_ranges: list[tuple[int, int]]  # [start, stop) runs of reachable keys, in order
    mask: torch.Tensor | None  # [batch, 1, rows, keys]; None when every gathered key is allowed


@dataclass(frozen=True)
class TiledPlan:
    """Block-sparse execution of a dense mask with fused SDPA calls.

    Queries are cut into tiles of `tile_size`; each attends to the key tiles holding any key
    the mask allows to any of its queries (over the whole batch), under the dense mask's own
    entries for those keys. Exact by construction: every allowed (q, k) pair is among the
    gathered keys, masked exactly as in `dense`. A contiguous run of keys is a view, not a copy;
    an all-True sub-mask is dropped so SDPA takes its unmasked kernel.
    """

    n_keys: int
    tiles: list[Tile]

    @staticmethod
    def build(dense: torch.Tensor, tile_size: int) -> TiledPlan:
        n_q, n_k = dense.shape[-2:]
        n_key_tiles = -(-n_k // tile_size)
        padded = torch.nn.functional.pad(dense[:, 0], (0, n_key_tiles * tile_size - n_k))
        tiles = []
        for start in range(0, n_q, tile_size):
            rows = slice(start, min(start + tile_size, n_q))
            reach = padded[:, rows].reshape(dense.shape[0], -1, n_key_tiles, tile_size)
            reached = reach.any(dim=(0, 1, 3)).nonzero().flatten().tolist()
            ranges: list[tuple[int, int]] = []
            for key_tile in reached:
                lo, hi = key_tile * tile_size, min((key_tile + 1) * tile_size, n_k)
                if ranges and ranges[-1][1] == lo:
                    ranges[-1] = (ranges[-1][0], hi)
                else:
                    ranges.append((lo, hi))
            keys = torch.cat([torch.arange(lo, hi, device=dense.device) for lo, hi in ranges])
            mask = dense[:, :, rows].index_select(-1, keys)
            tiles.append(Tile(rows, ranges, None if mask.all() else mask))
        return TiledPlan(n_k, tiles)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """q [batch, heads, n_q, d], k/v [batch, heads, n_k, d] (heads already matched)."""
        outs = []
        for tile in self.tiles:
            kt, vt = _gather(k, tile.key_ranges), _gather(v, tile.key_ranges)
            outs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, tile.rows], kt, vt, attn_mask=tile.mask, scale=scale
                )
            )
        return torch.cat(outs, dim=2)

    def density(self) -> float:
        """Share of the dense q×k work the plan computes (1.0 = no saving)."""
        done = sum(
            (t.rows.stop - t.rows.start) * sum(hi - lo for lo, hi in t.key_ranges)
            for t in self.tiles
        )
        return done / (self.tiles[-1].rows.stop * self.n_keys)


def _gather(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    if len(ranges) == 1:
        return x[:, :, ranges[0][0] : ranges[0][1]]
    return torch.cat([x[:, :, lo:hi] for lo, hi in ranges], dim=2)
