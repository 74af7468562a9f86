"""Top-k checkpoint merge (RECIPE.md §3): a uniform average of k HF checkpoint directories.

Streamed: one output shard at a time, each tensor accumulated in fp32 from lazily opened
safetensors files, so memory holds one shard, not k models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_map(directory: Path) -> dict[str, str]:
    """Tensor name → shard file of an HF checkpoint directory (sharded or single-file)."""
    if (directory / INDEX).exists():
        return json.loads((directory / INDEX).read_text())["weight_map"]
    if (directory / SINGLE).exists():
        with safe_open(directory / SINGLE, "pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)
    raise FileNotFoundError(f"{directory} holds no safetensors weights")


def merge_checkpoints(directories: list[Path], out: Path) -> None:
    """Write the parameter-wise mean of `directories` to `out` (layout and files of the first)."""
    if not directories:
        raise ValueError("nothing to merge")
    maps = [weight_map(Path(d)) for d in directories]
    names = set(maps[0])
    for d, m in zip(directories[1:], maps[1:], strict=True):
        if set(m) != names:
            diff = sorted(names ^ set(m))[:5]
            raise ValueError(f"{d} does not have the same tensors as {directories[0]}: {diff}")
    first = Path(directories[0])
    out.mkdir(parents=True, exist_ok=True)
    for item in first.iterdir():  # config, tokenizer, index: everything but the weights
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, out / item.name)
    shards: dict[str, list[str]] = {}
    for name, shard in maps[0].items():
        shards.setdefault(shard, []).append(name)
    for shard, shard_names in shards.items():
        merged: dict[str, torch.Tensor] = {}
        with safe_open(first / shard, "pt") as f:
            metadata = f.metadata()
        for name in shard_names:
            total, dtype = None, None
            for d, m in zip(directories, maps, strict=True):
                with safe_open(Path(d) / m[name], "pt") as f:
                    tensor = f.get_tensor(name)
                dtype = dtype or tensor.dtype
                total = tensor.float() if total is None else total.add_(tensor.float())
            merged[name] = total.div_(len(directories)).to(dtype)
        save_file(merged, out / shard, metadata=metadata)
