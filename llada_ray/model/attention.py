"""Running a Hugging Face model's attention under our layouts.

We register one attention implementation with transformers. The model's own code still computes
q/k/v, RoPE and the output projection; only the core softmax(qk^T)v is ours, driven by a
`MaskedAttention` passed down through the forward kwargs. No mask function is registered for it,
so transformers builds no mask of its own (it would be thrown away).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from llada_ray.diffusion.masks import AttentionLayout

Backend = Literal["block_sparse", "dense", "flex", "eager"]
IMPLEMENTATION = "llada_ray"


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Pick the backend for "auto": FlexAttention where it trains (CUDA), else block-sparse SDPA."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "block_sparse"
    return name  # type: ignore[return-value]


# What `_llada_attention` calls: (q, k, v, scale, layer index) → output. A MaskedAttention, or
# the decode engine's CachedAttention.
AttentionRunner = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float | None, int], torch.Tensor
]


class MaskedAttention:
    """One forward pass's attention: the layout's mask prepared once, shared by every layer."""

    def __init__(self, layout: AttentionLayout, backend: Backend, tile_size: int = 128) -> None:
        self.backend = backend
        if backend == "flex":
            self.block_mask = layout.flex_block_mask(tile_size)
        elif backend == "block_sparse":
            self.plan = layout.tiled(tile_size)
        else:
            self.mask = layout.dense()

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, layer: int
    ) -> torch.Tensor:
        """q [batch, heads, n_q, d]; k, v [batch, kv_heads, n_k, d] → [batch, heads, n_q, d].
        `layer` is the calling layer's index (a runner with a KV cache of its own needs it)."""
        if self.backend == "flex":
            return _flex(q.device.type)(
                q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=True
            )
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        if self.backend == "block_sparse":
            return self.plan.attend(q, k, v, scale)
        if self.backend == "dense":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale)
        return unfused_attention(q, k, v, self.mask, scale)


@functools.cache
def _flex(device_type: str) -> Callable:
    """Compiled FlexAttention on accelerators (the fused kernel); eager on CPU, forward only."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if device_type == "cpu" else torch.compile(flex_attention, dynamic=False)


def unfused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """matmul → masked softmax → matmul with the scores materialised: the reference baseline."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def _llada_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    llada_attention: AttentionRunner | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    if llada_attention is None:
        raise RuntimeError(
            f"attention implementation {IMPLEMENTATION!r} needs a layout: call the model through "
            "llada_ray.model.DiffusionLM, or model.set_attn_implementation('sdpa') for plain HF use"
        )
    out = llada_attention(query, key, value, scaling, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, _llada_attention)
