"""Save and load diffusion models as Hugging Face directories (safetensors + tokenizer)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llada_ray.model.adapter import ensure_mask_token

# The files of a model directory (weights, config, tokenizer, chat template); a training
# checkpoint's optimizer state and manifest are not part of the model.
MODEL_FILES = (".json", ".safetensors", ".txt", ".model", ".jinja")


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> None:
    """Weights as safetensors shards, config (with mask_token_id) and tokenizer, in HF layout."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def load_model(
    source: str | Path,
    *,
    mask_token: str = "<|mask|>",
    trust_remote_code: bool = False,
    dtype: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local directory or a hub id, ready for DiffusionLM.

    Weights load from safetensors only (`use_safetensors=True`: no pickle of untrusted files).
    A model without a mask token gets one (see `ensure_mask_token`).
    """
    tokenizer = load_tokenizer(source, mask_token=mask_token, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        attn_implementation="sdpa",
    )
    ensure_mask_token(model, tokenizer, mask_token)
    return model, tokenizer


def load_tokenizer(
    source: str | Path, *, mask_token: str = "<|mask|>", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` gives, without loading any weights."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_weights(
    tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, shard_bytes: int = 2 << 30
) -> None:
    """Weights in HF layout, written as they come: `model.safetensors`, or shards of about
    `shard_bytes` with their index. Memory holds one shard, never the whole model."""
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            written.append(_write_part(shard, directory, len(written)))
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        weight_map[name] = len(written)
        size, total = size + nbytes, total + nbytes
    written.append(_write_part(shard, directory, len(written)))
    if len(written) == 1:
        written[0].rename(directory / "model.safetensors")
        return
    names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for path, name in zip(written, names, strict=True):
        path.rename(directory / name)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: names[i] for k, i in weight_map.items()}}  # fmt: skip
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_part(tensors: dict[str, torch.Tensor], directory: Path, number: int) -> Path:
    path = directory / f"part-{number:05d}.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path
