"""Training rows by global sample index, and their collation into tensors.

Why not a Ray Data iterator here: a run killed mid-phase must resume on exactly the next sample,
and Ray Data's streaming split hands blocks to workers in whatever order they ask (and does not
resume mid-epoch). So each worker reads the rows it needs, by index, from the packed Parquet
shards (written by Ray Data, #3, in small row groups), and sample i of a run is a pure function of
(seed, run, i): epoch i // n, then a seeded permutation of the training rows. Global step s takes
samples [s·G, (s+1)·G) for the global batch G, and rank r's micro-batch m the slice at
(m·world + r)·micro. A checkpoint stores s; nothing is skipped or repeated after a restart, under
any number of workers that keeps G (the driver refuses another G).

The held-out split is every k-th stored row (k = round(1 / validation_fraction)): spread over the
whole corpus, fixed across runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch


class RowStore:
    """The rows of one packed dataset (manifest + Parquet shards), split train / validation,
    read lazily by global row index.

    The manifest's rows per shard map an index to a shard; the shard's footer (read once) to a
    row group. Only the row groups asked for are read, and at most `cached_groups` of them are
    kept: memory is bounded by the cache, not by the corpus.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        path: str,
        validation_fraction: float,
        cached_groups: int = 32,
    ) -> None:
        self.fs, self.path, self.cached_groups = fs, path, cached_groups
        with fs.open_input_stream(f"{path}/manifest.json") as stream:
            self.manifest = json.loads(stream.read())
        self.files = [f"{path}/{shard['file']}" for shard in self.manifest["shards"]]
        self.starts = np.cumsum([0] + [shard["rows"] for shard in self.manifest["shards"]])
        self.groups: dict[int, np.ndarray] = {}  # shard → first row of each row group (+ end)
        self.cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        n = int(self.starts[-1])
        ids = np.arange(n)
        if validation_fraction > 0 and n >= 2:
            stride = max(2, round(1 / validation_fraction))
            held_out = ids % stride == stride - 1
        else:
            held_out = np.zeros(n, dtype=bool)
        self.train_ids, self.val_ids = ids[~held_out], ids[held_out]
        if not len(self.train_ids):
            raise ValueError(f"{path} has no training rows")

    def _row_groups(self, shard: int) -> np.ndarray:
        if shard not in self.groups:
            with self.fs.open_input_file(self.files[shard]) as f:
                meta = pq.ParquetFile(f).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.groups[shard] = np.cumsum([0, *sizes])
        return self.groups[shard]

    def _group(self, shard: int, group: int) -> pa.Table:
        key = (shard, group)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        with self.fs.open_input_file(self.files[shard]) as f:
            table = pq.ParquetFile(f).read_row_group(group)
        self.cache[key] = table
        if len(self.cache) > self.cached_groups:
            self.cache.popitem(last=False)
        return table

    def rows(self, ids: np.ndarray) -> dict[str, list]:
        """The rows `ids` (global indices), in that order."""
        where: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (shard, group) → (pos, row)
        for pos, i in enumerate(np.asarray(ids)):
            if not 0 <= i < self.starts[-1]:
                raise IndexError(f"row {i} is outside {self.path} ({self.starts[-1]} rows)")
            shard = int(np.searchsorted(self.starts, i, side="right")) - 1
            local = int(i - self.starts[shard])
            bounds = self._row_groups(shard)
            group = int(np.searchsorted(bounds, local, side="right")) - 1
            where.setdefault((shard, group), []).append((pos, local - int(bounds[group])))
        parts, order = [], []
        for (shard, group), picks in where.items():
            table = self._group(shard, group)
            parts.append(table.take(pa.array([row for _, row in picks], type=pa.int64())))
            order.extend(pos for pos, _ in picks)
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(order), type=pa.int64())).to_pydict()

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one store per worker, lives as long
    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.train_ids))

    def train_sample(self, seed: int, index: np.ndarray) -> np.ndarray:
        """Row ids of global training samples `index` (epochs of seeded permutations)."""
        n = len(self.train_ids)
        epochs, within = np.divmod(index, n)
        out = np.empty_like(index)
        for epoch in np.unique(epochs):
            order = self._permutation(seed, int(epoch))
            sel = epochs == epoch
            out[sel] = self.train_ids[order[within[sel]]]
        return out


def micro_batch_index(
    step: int, micro: int, rank: int, world: int, micro_batch: int, accumulation: int
) -> np.ndarray:
    """Global sample indices of rank `rank`'s micro-batch `micro` in optimizer step `step`."""
    per_step = micro_batch * accumulation * world
    start = step * per_step + (micro * world + rank) * micro_batch
    return np.arange(start, start + micro_batch)


# --- collation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBatch:
    """Packed pre-training rows: tokens, document ids, which positions are real tokens and
    which are completion (after their document's prompt)."""

    input_ids: torch.Tensor  # [b, L]
    doc_ids: torch.Tensor  # [b, L]
    valid: torch.Tensor  # [b, L] False on the padding of the corpus's last row
    completion: torch.Tensor  # [b, L] every real token of a plain-text document

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        return _to(self, device)


def packed_batch(rows: dict[str, list]) -> PackedBatch:
    input_ids = torch.tensor(np.stack(rows["input_ids"]), dtype=torch.long)
    doc_ids = torch.tensor(np.stack(rows["doc_ids"]), dtype=torch.long)
    lengths = torch.tensor(rows["num_tokens"])
    valid = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    completion = torch.tensor(np.stack(rows["completion"]), dtype=torch.bool)
    return PackedBatch(input_ids, doc_ids, valid, completion)


@dataclass(frozen=True)
class ChatBatch:
    """Prompt + response sequences, right-padded to the longest; only responses are maskable.

    Each sequence is a multiple of the block size long (data.chat pads with EOS), so its blocks
    align; the batch padding is a document of its own, so no real token attends to it.
    """

    input_ids: torch.Tensor  # [b, n]
    doc_ids: torch.Tensor  # [b, n] 0 for the sequence, 1 for the batch padding
    maskable: torch.Tensor  # [b, n] response tokens (and their EOS padding)

    @property
    def tokens(self) -> int:
        return int((self.doc_ids == 0).sum())

    def to(self, device: torch.device | str) -> ChatBatch:
        return _to(self, device)


_Batch = TypeVar("_Batch", PackedBatch, ChatBatch)


def _to(batch: _Batch, device: torch.device | str) -> _Batch:
    return dataclasses.replace(
        batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)}
    )


def chat_batch(sequences: list[list[int]], prompt_lens: list[int], pad_id: int) -> ChatBatch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    doc = torch.ones_like(ids)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    for i, (seq, prompt_len) in enumerate(zip(sequences, prompt_lens, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        doc[i, : len(seq)] = 0
        maskable[i, prompt_len : len(seq)] = True
    return ChatBatch(ids, doc, maskable)


def sft_batch(rows: dict[str, list], pad_id: int) -> ChatBatch:
    return chat_batch(rows["input_ids"], rows["prompt_len"], pad_id)


def dpo_batch(rows: dict[str, list], pad_id: int) -> ChatBatch:
    """2b sequences: the b prompts with their chosen responses, then with the rejected ones (one
    forward pass for both sides)."""
    prompts = rows["prompt_ids"]
    chosen = [p + c for p, c in zip(prompts, rows["chosen_ids"], strict=True)]
    rejected = [p + r for p, r in zip(prompts, rows["rejected_ids"], strict=True)]
    return chat_batch(chosen + rejected, [len(p) for p in prompts] * 2, pad_id)
