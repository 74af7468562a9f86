"""Trainer state with torch.distributed.checkpoint (DCP): each rank writes and reads its shard.

Saving, every rank writes only what it holds: its FSDP shards, and under DDP a share of the
replicated tensors (DCP's planner writes each once, spread over the ranks). Loading, DCP plans
which slices each rank needs from whatever world size wrote them (load-time resharding), and
`ShardReader` fetches only the files that plan touches, checked against the manifest.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from llada_ray.train.checkpoint import get_file

SAFE_CLASSES = {  # what else a DCP .metadata holds: data, not code
    ("collections", "OrderedDict"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only DCP's own metadata classes and torch's dtypes,
    layouts, memory formats and Size may come out of it, never a callable that runs code."""

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:  # its own classes only
                return found
        if module == "torch":
            found = getattr(torch, name, None)
            if found is torch.Size or isinstance(
                found, torch.dtype | torch.layout | torch.memory_format
            ):
                return found
        if (module, name) in SAFE_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata may not hold {module}.{name}")


class ShardReader(FileSystemReader):
    """DCP reader of one part (`checkpoint.DCP_MODEL` / `DCP_OPTIM`) of a stored checkpoint."""

    def __init__(self, fs: pafs.FileSystem, path: str, manifest: dict, part: str) -> None:
        self.store, self.stored_path, self.manifest, self.part = fs, path, manifest, part
        remote = not isinstance(fs, pafs.LocalFileSystem)
        self.temp = Path(tempfile.mkdtemp(prefix="llada-dcp-")) if remote else None
        self.fetched: set[str] = set()
        self._fetch(".metadata")
        super().__init__((self.temp or Path(path)) / part)

    def _fetch(self, name: str) -> None:
        if name not in self.fetched:
            get_file(self.store, self.stored_path, f"{self.part}/{name}", self.manifest, self.temp)
            self.fetched.add(name)

    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        with Path(self.path, ".metadata").open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{self.stored_path}: {self.part}/.metadata is not DCP's")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner) -> Future[None]:
        for name in sorted({self.storage_data[i.storage_index].relative_path for i in plan.items}):
            self._fetch(name)
        return super().read_data(plan, planner)

    def cleanup(self) -> None:
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)


def save(state: dict, directory: Path) -> None:
    """Collective under a process group: this rank's shards of `state` into `directory`."""
    dcp.save(state, storage_writer=FileSystemWriter(directory), no_dist=not dist.is_initialized())


def load(state: dict, reader: FileSystemReader, partial: bool = False) -> None:
    """Fill `state` (sharded or not) in place from a DCP checkpoint."""
    dcp.load(
        state,
        storage_reader=reader,
        planner=DefaultLoadPlanner(allow_partial_load=partial),
        no_dist=not dist.is_initialized(),
    )


def stored_tensors(reader: FileSystemReader) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name → (shape, dtype) of every tensor in a DCP checkpoint, from its metadata alone."""
    return {
        name: (meta.size, meta.properties.dtype)
        for name, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


class DcpWeights:
    """The weights of a training checkpoint from its DCP model shards, in HF names (model.merge)."""

    def __init__(self, reader: FileSystemReader, prefix: str = "hf.") -> None:
        self.reader, self.prefix = reader, prefix
        self.stored = stored_tensors(reader)

    def __str__(self) -> str:
        return str(self.reader.path)

    def names(self) -> set[str]:
        return {k.removeprefix(self.prefix) for k in self.stored if k.startswith(self.prefix)}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = {
            self.prefix + n: torch.empty(self.stored[self.prefix + n][0],
                                         dtype=self.stored[self.prefix + n][1])
            for n in names
        }  # fmt: skip
        load(state, self.reader, partial=True)
        return {k.removeprefix(self.prefix): v for k, v in state.items()}
