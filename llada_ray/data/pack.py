"""Packing on Ray Data: tokenize with an actor pool, pack, persist Parquet shards + a manifest.

Ray Data gives a map function no end-of-stream signal, so a packer that carries its remainder
from batch to batch would lose the last one. Instead each batch packs the rows it can fill and
emits its remainder as one short, marked row; the driver (which does see the end) packs those
few remainders into the last rows. Padding therefore appears only in the very last row.

A stage's output directory holds `shards/*.parquet` and `manifest.json`, written last. A
manifest whose fingerprint (inputs, tokenizer, settings, format) matches is reused as is; a
directory without one is an interrupted attempt and is cleared and redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import WriteResult

from llada_ray.config import DpoStage, PipelineConfig, SftStage
from llada_ray.data.chat import ChatError, dpo_row, rows_name, sft_row
from llada_ray.data.corpus import (
    load_encoder,
    load_tokenizer,
    prepare_tokenizer,
    read_records,
    source_digest,
    tokenizer_digest,
)
from llada_ray.data.documents import BadRowError
from llada_ray.data.packing import Piece, Rows, pack

if TYPE_CHECKING:  # Datasink.write's context type has no public import path
    from ray.data._internal.execution.interfaces import TaskContext

FORMAT_VERSION = 3  # 2: the completion column; 3: small row groups, read by index
DOCUMENTS_PER_PACK_BATCH = 4096
ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("doc_ids", pa.list_(pa.int32())),
        ("segment_keys", pa.list_(pa.int64())),
        ("segment_offsets", pa.list_(pa.int64())),
        ("completion", pa.list_(pa.bool_())),
        ("num_tokens", pa.int32()),
    ]
)


class Tokenize:
    """Actor: loads the tokenizer once, encodes batches of documents, appends EOS to each, and
    counts the tokens of each document's prompt (its first `prompt_chars` characters)."""

    def __init__(self, fs: pafs.FileSystem, tokenizer_path: str) -> None:
        # One actor per CPU: the tokenizer's own thread pool would oversubscribe. (A pool of
        # 2-thread actors measured slower here: a batch waits for its longest document.)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.encoder = load_encoder(fs, tokenizer_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        good = [i for i, e in enumerate(errors) if not e]
        texts, prompts = batch.column("text").to_pylist(), batch.column("prompt_chars")
        encoded = iter(
            self.encoder.encode([texts[i] for i in good], [prompts[i].as_py() for i in good])
        )
        eos = self.encoder.eos_id
        tokens, prompt_tokens = [], []
        for e in errors:
            ids, n_prompt = ([], 0) if e else next(encoded)
            tokens.append(ids if e else [*ids, eos])
            prompt_tokens.append(n_prompt)
        return pa.table(
            {
                "key": batch.column("key"),
                "tokens": pa.array(tokens, type=pa.list_(pa.int32())),
                "prompt_tokens": pa.array(prompt_tokens, type=pa.int32()),
                "error": batch.column("error"),
            }
        )


def _pack_batch(batch: pa.Table, *, seq_len: int, pad_id: int, split_documents: bool) -> pa.Table:
    """This batch's full rows, then one tail row (complete = False): the batch's remainder
    (possibly empty) and, as JSON in `stats`, what the batch held (documents, tokens, bad rows).
    The driver reads only the tail rows: remainders and counts in one small pass."""
    errors = batch.column("error").to_pylist()
    keys, tokens = batch.column("key").to_pylist(), batch.column("tokens")
    prompts = batch.column("prompt_tokens").to_pylist()
    pieces = []
    for i, e in enumerate(errors):
        if not e:
            ids = tokens[i].values.to_numpy(zero_copy_only=False)
            pieces.append(Piece(keys[i], 0, ids, np.arange(len(ids)) >= prompts[i]))
    rows, rest = pack(pieces, seq_len, pad_id, carry=True, split_documents=split_documents)
    tail, _ = pack(rest, max(sum(len(p.tokens) for p in rest), 1), pad_id, carry=True)
    bad = Counter(e for e in errors if e)
    stats = {"documents": len(pieces), "tokens": sum(len(p.tokens) for p in pieces), "bad": bad}
    return pa.concat_tables(
        [
            _rows_table(rows, complete=True, stats=None),
            _rows_table(tail, complete=False, stats=json.dumps(stats)),
        ]
    )


def _rows_table(rows: Rows, complete: bool, stats: str | None = None) -> pa.Table:
    columns = rows.to_columns()
    table = pa.table(
        {
            name: pa.array(columns[name], type=ROW_SCHEMA.field(name).type)
            for name in ROW_SCHEMA.names
        }
    )
    if not len(rows) and not complete:  # an empty remainder still carries the batch's stats
        table = pa.Table.from_pylist(
            [
                {
                    "input_ids": [],
                    "doc_ids": [],
                    "segment_keys": [],
                    "segment_offsets": [],
                    "completion": [],
                    "num_tokens": 0,
                }
            ],
            schema=ROW_SCHEMA,
        )
    n = table.num_rows
    table = table.append_column("complete", pa.array([complete] * n, type=pa.bool_()))
    return table.append_column("stats", pa.array([stats] * n, type=pa.string()))


def _pieces_of(fragment: dict) -> list[Piece]:
    ids, docs = np.asarray(fragment["input_ids"]), np.asarray(fragment["doc_ids"])
    completion = np.asarray(fragment["completion"], dtype=bool)
    return [
        Piece(int(key), int(offset), ids[docs == seg], completion[docs == seg])
        for seg, (key, offset) in enumerate(
            zip(fragment["segment_keys"], fragment["segment_offsets"], strict=True)
        )
    ]


# --- streamed shards --------------------------------------------------------------------------


ROWS_PER_GROUP = 16  # training reads rows by index (train.batches.RowStore): small row groups


class ShardSink(Datasink[dict]):
    """Streams rows to Parquet shards: one file per write task, in small row groups.

    Each task splits its blocks into the rows to store and a small side result (packing's
    marked remainders, chat rows' rejection reasons), writes the rows, and returns the side
    result with the file's name, bytes, rows and sha256: the driver builds the manifest from
    these, without reading any shard back or holding the dataset anywhere.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, split: Callable[[pa.Table], tuple]) -> None:
        self.fs, self.path, self.split = fs, path, split
        self.results: list[dict] = []

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        rows, side = self.split(pa.concat_tables(tables)) if tables else (None, [])
        out: dict = {"index": ctx.task_idx, "side": side, "shard": None}
        if rows is not None and rows.num_rows:
            out["shard"] = write_shard(self.fs, self.path, f"{ctx.task_idx:06d}.parquet", rows)
        return out

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        self.results = sorted(write_result.write_returns, key=lambda r: r["index"])

    @property
    def shards(self) -> list[dict]:
        return [r["shard"] for r in self.results if r["shard"]]

    @property
    def sides(self) -> list:
        return [item for r in self.results for item in r["side"]]


def write_shard(fs: pafs.FileSystem, path: str, name: str, rows: pa.Table) -> dict:
    """One Parquet shard under `<path>/shards/`, described for the manifest."""
    buffer = pa.BufferOutputStream()
    pq.write_table(rows, buffer, row_group_size=ROWS_PER_GROUP)
    data = buffer.getvalue()
    with fs.open_output_stream(f"{path}/shards/{name}") as out:
        out.write(data)
    return {
        "file": f"shards/{name}",
        "bytes": data.size,
        "rows": rows.num_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# --- manifests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """A stage's data as stored: where, its manifest, and whether this call reused it."""

    path: str
    manifest: dict
    reused: bool

    def shard_paths(self) -> list[str]:
        return [f"{self.path}/{s['file']}" for s in self.manifest["shards"]]

    @property
    def digest(self) -> str:
        """What the rows are: a training checkpoint records it, and a resume must match it."""
        fingerprint = json.dumps(self.manifest["fingerprint"], sort_keys=True)
        return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{path}/manifest.json") as stream:
            manifest = json.loads(stream.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
    infos = fs.get_file_info([f"{path}/{s['file']}" for s in manifest.get("shards", [])])
    if any(info.size != s["bytes"] for info, s in zip(infos, manifest["shards"], strict=True)):
        return None  # a shard is missing or was changed: the manifest no longer holds
    return manifest


def _write_manifest(fs: pafs.FileSystem, path: str, manifest: dict) -> dict:
    """The commit point: written last, after every shard is in place."""
    manifest = {**manifest, "created": time.time()}
    with fs.open_output_stream(f"{path}/manifest.json") as out:
        out.write(json.dumps(manifest, indent=2).encode())
    return manifest


def _fresh(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(f"{path}/shards")


# --- stages -----------------------------------------------------------------------------------


def pack_pretraining(
    cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str, tokenizer_path: str
) -> Packed:
    """Pack `data.pretrain` into rows of `data.seq_len` under `<run>/data/pretrain`."""
    path = f"{run_root}/data/pretrain"
    fingerprint = {
        "format": FORMAT_VERSION,
        "kind": "pretrain",
        "sources": source_digest(cfg.data.pretrain, cfg.storage),
        "task": cfg.data.task.model_dump(mode="json"),
        "tokenizer": tokenizer_digest(fs, tokenizer_path),
        "seq_len": cfg.data.seq_len,
        "split_documents": cfg.data.split_documents,
        "max_document_chars": cfg.data.max_document_chars,
    }
    manifest = _read_manifest(fs, path)
    if manifest and manifest["fingerprint"] == fingerprint:
        return Packed(path, manifest, reused=True)
    _fresh(fs, path)
    encoder = load_encoder(fs, tokenizer_path)
    chat = any(getattr(s, "format", "text") == "chat" for s in cfg.data.pretrain)
    tokenizer = load_tokenizer(fs, tokenizer_path) if chat else None

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same corpus always packs the same rows
    sink = ShardSink(fs, path, _split_packed)
    with _bad_row_errors():
        (
            read_records(cfg.data.pretrain, cfg, tokenizer=tokenizer)
            .map_batches(
                Tokenize,
                fn_constructor_args=(fs, tokenizer_path),
                batch_format="pyarrow",
                batch_size=256,
                compute=_actor_pool(),
            )
            .map_batches(
                _pack_batch,
                fn_kwargs={
                    "seq_len": cfg.data.seq_len,
                    "pad_id": encoder.pad_id,
                    "split_documents": cfg.data.split_documents,
                },
                batch_size=DOCUMENTS_PER_PACK_BATCH,
                batch_format="pyarrow",
            )
            .write_datasink(sink)
        )
    tails = sink.sides
    stats = [json.loads(t["stats"]) for t in tails]
    bad_rows = sum((Counter(s["bad"]) for s in stats), Counter())
    tokens = sum(s["tokens"] for s in stats)
    pieces = [p for tail in tails for p in _pieces_of(tail)]
    last_rows, _ = pack(
        pieces, cfg.data.seq_len, encoder.pad_id, split_documents=cfg.data.split_documents
    )
    shards = sink.shards
    if len(last_rows):
        last = _rows_table(last_rows, complete=True).drop_columns(["complete", "stats"])
        shards.append(write_shard(fs, path, "last.parquet", last))
    manifest = {
        "fingerprint": fingerprint,
        "tokens": tokens,
        "documents": sum(s["documents"] for s in stats),
        "bad_rows": dict(sorted(bad_rows.items())),
        "tokenizer": {
            "path": tokenizer_path,
            "eos": encoder.eos_id,
            "pad": encoder.pad_id,
            "vocab": encoder.tokenizer.get_vocab_size(),
        },
        "restart_positions": cfg.data.restart_positions,
        "rows": sum(s["rows"] for s in shards),
        "shards": shards,
    }
    capacity = manifest["rows"] * cfg.data.seq_len
    manifest["padding_tokens"] = capacity - tokens
    manifest["padding_fraction"] = (capacity - tokens) / max(capacity, 1)
    return Packed(path, _write_manifest(fs, path, manifest), reused=False)


class ChatRows:
    """Actor: JSON samples → SFT or DPO rows; a sample that cannot be one gets its reason."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        tokenizer_path: str,
        kind: str,
        block_size: int,
        max_len: int,
        fail: bool,
    ) -> None:
        self.tokenizer = load_tokenizer(fs, tokenizer_path)
        self.build = sft_row if kind == "sft" else dpo_row
        self.block_size, self.max_len, self.fail = block_size, max_len, fail

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for record in batch.to_pylist():
            error, row = record["error"], None
            if not error:
                try:
                    row = self.build(
                        json.loads(record["text"]), self.tokenizer, self.block_size, self.max_len
                    ).to_dict()
                except json.JSONDecodeError:
                    error = "invalid_json"
                except ChatError as err:
                    error = err.reason
            if error and self.fail:
                raise BadRowError(f"bad row ({error}) at {record['where']}")
            out.append({"row": json.dumps(row) if row else None, "error": error})
        return pa.Table.from_pylist(
            out, schema=pa.schema([("row", pa.string()), ("error", pa.string())])
        )


def build_chat_rows(
    cfg: PipelineConfig,
    fs: pafs.FileSystem,
    run_root: str,
    tokenizer_path: str,
    kind: Literal["sft", "dpo"],
    block_size: int,
    max_len: int,
) -> Packed:
    """SFT rows (`data.sft`) or DPO rows (`data.dpo`) under `<run>/data/<kind>-b<block>-n<len>`."""
    path = f"{run_root}/data/{rows_name(kind, block_size, max_len)}"
    sources = cfg.data.sft if kind == "sft" else cfg.data.dpo
    fingerprint = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "sources": source_digest(sources, cfg.storage),
        "task": cfg.data.task.model_dump(mode="json"),
        "tokenizer": tokenizer_digest(fs, tokenizer_path),
        "block_size": block_size,
        "max_len": max_len,
    }
    manifest = _read_manifest(fs, path)
    if manifest and manifest["fingerprint"] == fingerprint:
        return Packed(path, manifest, reused=True)
    _fresh(fs, path)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    sink = ShardSink(fs, path, _split_chat)
    with _bad_row_errors():
        read_records(sources, cfg, kind=kind).map_batches(
            ChatRows,
            fn_constructor_args=(
                fs,
                tokenizer_path,
                kind,
                block_size,
                max_len,
                cfg.data.bad_rows == "fail",
            ),
            batch_format="pyarrow",
            batch_size=256,
            compute=_actor_pool(),
        ).write_datasink(sink)
    manifest = {
        "fingerprint": fingerprint,
        "bad_rows": dict(sorted(Counter(sink.sides).items())),
        "rows": sum(s["rows"] for s in sink.shards),
        "shards": sink.shards,
    }
    return Packed(path, _write_manifest(fs, path, manifest), reused=False)


def _split_packed(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Packed rows to store, and the marked remainders (with their stats) for the driver."""
    complete = pc.equal(table.column("complete"), True)
    full = table.filter(complete).drop_columns(["complete", "stats"])
    return full, table.filter(pc.invert(complete)).to_pylist()


def _split_chat(table: pa.Table) -> tuple[pa.Table | None, list[str]]:
    """Chat rows to store (decoded from their JSON), and the rejected samples' reasons."""
    errors = table.column("error").to_pylist()
    rows = [json.loads(r) for r, e in zip(table.column("row").to_pylist(), errors, strict=True)
            if not e]  # fmt: skip
    return (pa.Table.from_pylist(rows) if rows else None), [e for e in errors if e]


# --- shared -----------------------------------------------------------------------------------


def read_packed(packed: Packed, fs: pafs.FileSystem) -> ray.data.Dataset:
    """The stored rows as a Ray Dataset (training splits it across workers)."""
    return ray.data.read_parquet(packed.shard_paths(), filesystem=fs)


def _actor_pool() -> ray.data.ActorPoolStrategy:
    """One actor per CPU from the start: packing runs before training, with the cluster to
    itself. Safe because reading is fused into the actors (`read_records`): a read task that
    needed a CPU of its own would wait forever behind a pool holding all of them."""
    if not ray.is_initialized():
        ray.init()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=cpus, initial_size=cpus)


@contextlib.contextmanager
def _bad_row_errors() -> Iterator[None]:
    """Ray wraps a worker's BadRowError in its own exception: surface ours, with its message."""
    try:
        yield
    except BadRowError:
        raise
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, BadRowError):
                raise BadRowError(str(cause)) from None
            cause = cause.__cause__ or cause.__context__
        marker = "BadRowError: "
        if marker in str(err):
            raise BadRowError(str(err).split(marker, 1)[1].splitlines()[0]) from None
        raise


def pack_all(cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str) -> dict[str, Packed]:
    """Everything the config's stages read: pre-training rows, SFT rows per block size, DPO rows."""
    tokenizer_path = prepare_tokenizer(cfg, fs, run_root)
    out: dict[str, Packed] = {}
    kinds = {stage.stage for stage in cfg.stages}
    if kinds & {"ar_pretrain", "cpt"}:
        out["pretrain"] = pack_pretraining(cfg, fs, run_root, tokenizer_path)
    for stage in cfg.stages:
        if isinstance(stage, SftStage | DpoStage):
            kind = "dpo" if isinstance(stage, DpoStage) else "sft"
            name = rows_name(kind, stage.block_size, stage.max_len)
            if name in out:
                continue  # CAP reads the same rows as SFT with the same block size and length
            out[name] = build_chat_rows(
                cfg, fs, run_root, tokenizer_path, kind, stage.block_size, stage.max_len
            )
    return out
