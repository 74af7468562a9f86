"""Top-k checkpoint merge (RECIPE.md §3): a uniform average of k checkpoints' weights.

The sources are HF directories or a training run's DCP model shards (checkpoints before a run's
end carry no HF export). The output takes the layout of an HF directory `like` (its files, shard
split and dtypes). Streamed: tensors are averaged a chunk of bytes at a time, each in fp32, so
memory holds one chunk per source, not k models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CHUNK_BYTES = 256 << 20


class Weights(Protocol):
    """Named tensors of one checkpoint."""

    def names(self) -> set[str]: ...

    def read(self, names: list[str]) -> dict[str, torch.Tensor]: ...


def weight_map(directory: Path) -> dict[str, str]:
    """Tensor name → shard file of an HF checkpoint directory (sharded or single-file)."""
    if (directory / INDEX).exists():
        return json.loads((directory / INDEX).read_text())["weight_map"]
    if (directory / SINGLE).exists():
        with safe_open(directory / SINGLE, "pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)
    raise FileNotFoundError(f"{directory} holds no safetensors weights")


class HFWeights:
    """The safetensors of an HF directory, opened lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.map = Path(directory), weight_map(Path(directory))

    def __str__(self) -> str:
        return str(self.directory)

    def names(self) -> set[str]:
        return set(self.map)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.map[name], []).append(name)
        out = {}
        for file, in_file in by_file.items():  # each file opened once
            with safe_open(self.directory / file, "pt") as f:
                out |= {name: f.get_tensor(name) for name in in_file}
        return out


def merge_checkpoints(sources: list[Weights], like: Path, out: Path) -> None:
    """Write the parameter-wise mean of `sources` to `out`, laid out as the HF directory `like`
    (whose config and tokenizer files are copied)."""
    if not sources:
        raise ValueError("nothing to merge")
    like = Path(like)
    layout = weight_map(like)
    for source in sources:  # a source may hold more (DCP keeps a tied head twice), never less
        if missing := sorted(set(layout) - source.names()):
            raise ValueError(f"{source} does not have the same tensors as {like}: {missing[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    for item in like.iterdir():  # config, tokenizer, index: everything but the weights
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, out / item.name)
    files: dict[str, list[str]] = {}
    for name, file in layout.items():
        files.setdefault(file, []).append(name)
    for file, names in files.items():
        with safe_open(like / file, "pt") as f:
            metadata = f.metadata()
            dtypes = {n: f.get_slice(n).get_dtype() for n in names}
            sizes = {n: f.get_slice(n).get_shape() for n in names}
        merged: dict[str, torch.Tensor] = {}
        for chunk in _chunks(names, sizes):
            total: dict[str, torch.Tensor] = {}
            for source in sources:
                for name, tensor in source.read(chunk).items():
                    if name in total:
                        total[name].add_(tensor.float())
                    else:
                        total[name] = tensor.float().clone()
            for name in chunk:
                merged[name] = total[name].div_(len(sources)).to(_DTYPES[dtypes[name]])
        save_file(merged, out / file, metadata=metadata)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _chunks(names: list[str], shapes: dict[str, list[int]]) -> list[list[str]]:
    """Names in groups of about CHUNK_BYTES (fp32) each."""
    out: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = 4 * int(torch.Size(shapes[name]).numel())
        if out[-1] and size + nbytes > CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(name)
        size += nbytes
    return out
