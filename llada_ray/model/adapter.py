"""An HF causal LM (Llama / Qwen2 / Qwen3 families) run as a block-diffusion LM."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llada_ray.diffusion.masks import (
    AttentionLayout,
    block_diffusion_layout,
    causal_layout,
    stable_layout,
)
from llada_ray.model.attention import (
    IMPLEMENTATION,
    AttentionRunner,
    MaskedAttention,
    resolve_backend,
)


def ensure_mask_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mask_token: str
) -> int:
    """Give the tokenizer a mask token (unless it has one) and the model a row for it.

    The id is recorded as `model.config.mask_token_id`. Embeddings only grow: real checkpoints
    often have more rows than the tokenizer has tokens (Qwen: 151936 vs 151669), and those rows
    must stay. A tokenizer without a pad token gets pad = EOS (as LLaDA2); pad must never be mask.
    """
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id == tokenizer.mask_token_id:
        raise ValueError(f"pad and mask token are the same ({tokenizer.mask_token!r})")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.mask_token_id = tokenizer.mask_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return tokenizer.mask_token_id


def embedding_rms(model: PreTrainedModel) -> float:
    """Root mean square of the input embedding weights: the default masked-embedding noise σ."""
    weight = model.get_input_embeddings().weight.detach()
    if hasattr(weight, "full_tensor"):  # an FSDP shard: the whole table (a collective)
        weight = weight.full_tensor()
    return weight.float().pow(2).mean().sqrt().item()


class DiffusionLM(nn.Module):
    """Wraps a causal LM: our attention layouts, our position ids, logits for chosen rows only.

    It is an nn.Module so DDP / FSDP / DeepSpeed wrap it like any model; `hf` stays the plain
    Hugging Face model that is saved and loaded.
    """

    def __init__(self, hf: PreTrainedModel, attention: str = "auto", tile_size: int = 128) -> None:
        super().__init__()
        if getattr(hf.config, "mask_token_id", None) is None:
            raise ValueError("model.config.mask_token_id is not set: call ensure_mask_token first")
        hf.set_attn_implementation(IMPLEMENTATION)
        self.hf = hf
        self.mask_token_id: int = hf.config.mask_token_id
        self.attention = attention
        self.tile_size = tile_size

    def prepare(self, layout: AttentionLayout) -> MaskedAttention:
        """The layout's mask built for this model's backend and device: a decoder reuses it for
        every step of a block, whose queries and keys do not change."""
        device = self.hf.get_input_embeddings().weight.device
        return MaskedAttention(layout, resolve_backend(self.attention, device), self.tile_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        layout: AttentionLayout | AttentionRunner,
        position_ids: torch.Tensor,
        logits_for: int | None = None,
        embed_noise_std: float = 0.0,
    ) -> torch.Tensor:
        """Logits [batch, logits_for or n, vocab] for the first `logits_for` input positions.

        `embed_noise_std` > 0 adds N(0, σ²) to the embedding output at mask-token positions
        (early-CPT stability: the AR model never trained the mask token's embedding).
        `layout` may come `prepare`d, or be any attention runner (the decode engine's, which
        keeps its own KV cache).
        """
        embeds = self.hf.get_input_embeddings()(input_ids)
        if embed_noise_std > 0:
            at_mask = (input_ids == self.mask_token_id).unsqueeze(-1)
            embeds = embeds + embed_noise_std * torch.randn_like(embeds) * at_mask
        runner = self.prepare(layout) if isinstance(layout, AttentionLayout) else layout
        hidden = self.hf.base_model(
            inputs_embeds=embeds,
            position_ids=position_ids,
            use_cache=False,
            llada_attention=runner,
        ).last_hidden_state
        if logits_for is not None:
            hidden = hidden[:, :logits_for]
        return self.hf.get_output_embeddings()(hidden)


# Inputs for DiffusionLM.forward, one per mode. They build keyword arguments rather than calling
# the model so that a wrapped model (DDP, FSDP, DeepSpeed) is still called through its forward.


def block_diffusion_inputs(
    xt: torch.Tensor,
    x0: torch.Tensor,
    doc_ids: torch.Tensor,
    position_ids: torch.Tensor,
    block_size: int,
) -> dict:
    """BD training: input [xt ; x0] (2L), both halves at the same positions; logits of xt only."""
    return {
        "input_ids": torch.cat([xt, x0], 1),
        "layout": block_diffusion_layout(doc_ids, block_size),
        "position_ids": torch.cat([position_ids, position_ids], 1),
        "logits_for": xt.shape[1],
    }


def stable_inputs(xt: torch.Tensor, doc_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The stable phase (block = L): xt alone, bidirectional within each document."""
    return {"input_ids": xt, "layout": stable_layout(doc_ids), "position_ids": position_ids}


def causal_inputs(x: torch.Tensor, doc_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Autoregressive forward (AR pre-training, the AR baseline), confined to each document."""
    return {"input_ids": x, "layout": causal_layout(doc_ids), "position_ids": position_ids}
