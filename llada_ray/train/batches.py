"""Training rows by global sample index, and their collation into tensors.

Why not a Ray Data iterator here: a run killed mid-phase must resume on exactly the next sample,
and Ray Data's streaming split hands blocks to workers in whatever order they ask (and does not
resume mid-epoch). So the packed shards (written by Ray Data, #3) are read by each worker with
pyarrow, and sample i of a run is a pure function of (seed, run, i): epoch i // n, then a seeded
permutation of the training rows. Global step s takes samples [s·G, (s+1)·G) for the global batch
G, and rank r's micro-batch m the slice at (m·world + r)·micro. A checkpoint stores s; nothing is
skipped or repeated after a restart (with the same number of workers: the loop refuses another).

The held-out split is every k-th stored row (k = round(1 / validation_fraction)): spread over the
whole corpus, fixed across runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch


class RowStore:
    """The rows of one packed dataset (manifest + parquet shards), split train / validation."""

    def __init__(self, fs: pafs.FileSystem, path: str, validation_fraction: float) -> None:
        with fs.open_input_stream(f"{path}/manifest.json") as stream:
            self.manifest = json.loads(stream.read())
        tables = []
        for shard in self.manifest["shards"]:
            with fs.open_input_file(f"{path}/{shard['file']}") as f:
                tables.append(pq.read_table(f))
        self.table = pa.concat_tables(tables).combine_chunks()
        n = self.table.num_rows
        ids = np.arange(n)
        if validation_fraction > 0 and n >= 2:
            stride = max(2, round(1 / validation_fraction))
            held_out = ids % stride == stride - 1
        else:
            held_out = np.zeros(n, dtype=bool)
        self.train_ids, self.val_ids = ids[~held_out], ids[held_out]
        if not len(self.train_ids):
            raise ValueError(f"{path} has no training rows")

    def rows(self, ids: np.ndarray) -> dict[str, list]:
        return self.table.take(pa.array(ids, type=pa.int64())).to_pydict()

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
