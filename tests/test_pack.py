"""Packing on a real Ray cluster, from local disk and from the moto S3 server."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from llada_ray.config import PipelineConfig
from llada_ray.data import tasks
from llada_ray.data.chat import prompt_ids
from llada_ray.data.corpus import prepare_tokenizer
from llada_ray.data.documents import BadRowError, document_key
from llada_ray.data.pack import build_chat_rows, pack_pretraining, read_packed
from llada_ray.data.packing import unpack
from llada_ray.storage import storage_root
from llada_ray.train.batches import RowStore

pytestmark = pytest.mark.integration
SEQ_LEN = 64


def good_docs(n: int = 60) -> list[str]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "0", "17", "x=y", "café", "\u4e2d"]
    # lengths from a couple of tokens to several rows
    return [
        " ".join(rng.choice(words) for _ in range(rng.choice([1, 5, 20, 90]))) for _ in range(n)
    ]


def write_corpus(root: Path, big: bool) -> dict[int, str]:
    """docs.jsonl (good rows + one bad row of each kind) and texts/ (one document per file)."""
    (root / "texts").mkdir(parents=True)
    entries: list[tuple[bytes, str | None]] = [
        (json.dumps({"text": t}).encode(), t) for t in good_docs()
    ]
    bad = [
        b'{"text": "caf\xe9"}',
        json.dumps({"text": " "}).encode(),
        json.dumps({"body": "x"}).encode(),
        json.dumps({"text": 5}).encode(),
        b"{oops",
    ]
    for i, line in enumerate(bad):
        entries.insert(3 + 7 * i, (line, None))
    (root / "docs.jsonl").write_bytes(b"\n".join(line for line, _ in entries) + b"\n")
    expected = {
        document_key(0, 0, row): text for row, (_, text) in enumerate(entries) if text is not None
    }
    (root / "texts" / "a.txt").write_text("a whole file is one document " * 30)
    (root / "texts" / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    expected[document_key(1, 0, 0)] = (root / "texts" / "a.txt").read_text()
    if big:
        (root / "texts" / "c.txt").write_text("z" * 50_000_000)  # 50 MB: a bad row, not a crash
    return expected


def config(
    tmp: Path, corpus: str, storage: dict, tokenizer: Path, **data: object
) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "packtest",
            "tokenizer": {"source": str(tokenizer)},
            "data": {
                "seq_len": SEQ_LEN,
                "pretrain": [
                    {"type": "files", "path": f"{corpus}/docs.jsonl", "format": "jsonl"},
                    {"type": "files", "path": f"{corpus}/texts", "format": "text"},
                ],
                "sft": [
                    {"type": "task", "examples": 40, "seed": 3},
                    {"type": "files", "path": f"{corpus}/chats.jsonl"},
                ],
                "dpo": [{"type": "task", "examples": 20, "seed": 4}],
                **data,
            },
            "stages": [
                {
                    "stage": "cpt",
                    "phases": [{"name": "b4", "block_size": 4, "tokens": 1000, "lr": 1e-4}],
                }
            ],
            "storage": storage,
        }
    )


def packed_rows(packed, fs: pafs.FileSystem) -> list[dict]:
    return read_packed(packed, fs).take_all()


def test_pack_round_trip_bad_rows_and_reuse(ray_cluster, tmp_path: Path, tiny_tokenizer) -> None:
    expected = write_corpus(tmp_path / "corpus", big=True)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    cfg = config(
        tmp_path, str(tmp_path / "corpus"), {"root": str(tmp_path / "runs")}, tmp_path / "tok"
    )
    fs, root = storage_root(cfg.storage)
    tok_path = prepare_tokenizer(cfg, fs, f"{root}/packtest")
    packed = pack_pretraining(cfg, fs, f"{root}/packtest", tok_path)
    m = packed.manifest
    assert not packed.reused
    assert m["bad_rows"] == {
        "non_utf8": 2,
        "empty": 1,
        "missing_field": 1,
        "wrong_type": 1,
        "invalid_json": 1,
        "too_long": 1,
    }
    assert m["documents"] == len(expected)

    rows = packed_rows(packed, fs)
    eos = tiny_tokenizer.eos_token_id
    want = {
        k: np.array(tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos])
        for k, t in expected.items()
    }
    back = unpack(rows)
    assert list(back) == sorted(want)  # corpus order, none lost, none duplicated
    for key, tokens in want.items():
        assert np.array_equal(back[key], tokens)
    assert m["tokens"] == sum(len(t) for t in want.values())
    assert [r["num_tokens"] for r in rows[:-1]] == [SEQ_LEN] * (len(rows) - 1)
    assert m["padding_tokens"] == SEQ_LEN - rows[-1]["num_tokens"]
    assert any(len(r["segment_keys"]) > 1 for r in rows)  # documents really share rows
    assert sum(s["rows"] for s in m["shards"]) == m["rows"] == len(rows)

    # Streamed: each write task described its own shard (checked here against the files), in
    # row groups small enough to read a row by index; the lazy reader gives Ray Data's rows.
    for shard in m["shards"]:
        data = Path(packed.path, shard["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
        meta = pq.ParquetFile(Path(packed.path, shard["file"])).metadata
        assert meta.num_rows == shard["rows"]
        assert max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) <= 16
    store = RowStore(fs, packed.path, validation_fraction=0.0)
    order = np.random.default_rng(0).permutation(len(rows))
    lazily = store.rows(order)
    for k, i in enumerate(order):
        assert lazily["input_ids"][k] == list(rows[i]["input_ids"])
        assert lazily["segment_keys"][k] == list(rows[i]["segment_keys"])

    mtimes = [fs.get_file_info(p).mtime_ns for p in packed.shard_paths()]
    again = pack_pretraining(cfg, fs, f"{root}/packtest", tok_path)
    assert again.reused and again.manifest == m
    assert [fs.get_file_info(p).mtime_ns for p in again.shard_paths()] == mtimes

    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={"bad_rows": "fail"})})
    with pytest.raises(BadRowError, match=r"\(non_utf8\) at .*docs.jsonl row 3"):
        pack_pretraining(strict, fs, f"{root}/strict", tok_path)


def test_same_packing_from_s3_as_from_disk(ray_cluster, s3, tmp_path: Path, tiny_tokenizer) -> None:
    write_corpus(tmp_path / "corpus", big=False)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    client = s3.client()
    for path in sorted((tmp_path / "corpus").rglob("*")):
        if path.is_file():
            key = f"corpus/{path.relative_to(tmp_path / 'corpus')}"
            client.put_object(Bucket=s3.bucket, Key=key, Body=path.read_bytes())
    results = []
    for corpus, storage in [
        (str(tmp_path / "corpus"), {"root": str(tmp_path / "runs")}),
        (
            f"s3://{s3.bucket}/corpus",
            {"root": f"s3://{s3.bucket}/runs", "endpoint_url": s3.endpoint_url},
        ),
    ]:
        cfg = config(tmp_path, corpus, storage, tmp_path / "tok")
        fs, root = storage_root(cfg.storage)
        tok_path = prepare_tokenizer(cfg, fs, f"{root}/packtest")
        packed = pack_pretraining(cfg, fs, f"{root}/packtest", tok_path)
        rows = packed_rows(packed, fs)
        results.append(
            (
                [(list(r["input_ids"]), list(r["doc_ids"])) for r in rows],
                {
                    k: v
                    for k, v in packed.manifest.items()
                    if k in ("rows", "tokens", "documents", "bad_rows")
                },
            )
        )
    assert s3.keys("runs/packtest/data/pretrain/manifest.json")
    assert results[0] == results[1]


def test_sft_rows_from_tasks_and_chat_file(ray_cluster, tmp_path: Path, tiny_tokenizer) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus, big=False)
    chats = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"prompt": "wrong shape"}),
        "{broken",
    ]
    (corpus / "chats.jsonl").write_text("\n".join(chats) + "\n")
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    cfg = config(tmp_path, str(corpus), {"root": str(tmp_path / "runs")}, tmp_path / "tok")
    fs, root = storage_root(cfg.storage)
    tok_path = prepare_tokenizer(cfg, fs, f"{root}/packtest")
    packed = build_chat_rows(cfg, fs, f"{root}/packtest", tok_path, "sft", 16, 256)
    assert packed.manifest["rows"] == 41
    assert packed.manifest["bad_rows"] == {"no_response": 1, "missing_field": 1, "invalid_json": 1}
    rows = packed_rows(packed, fs)
    assert len(rows) == 41
    for row in rows:
        assert len(row["input_ids"]) % 16 == 0 and 0 < row["prompt_len"] < len(row["input_ids"])

    pairs = packed_rows(build_chat_rows(cfg, fs, f"{root}/packtest", tok_path, "dpo", 16, 256), fs)
    assert len(pairs) == 20
    for pair in pairs:
        for side in ("chosen_ids", "rejected_ids"):
            assert (len(pair["prompt_ids"]) + len(pair[side])) % 16 == 0
        assert list(pair["chosen_ids"]) != list(pair["rejected_ids"])


def test_chat_task_documents_pack_whole_with_their_completion(
    ray_cluster, tmp_path: Path, tiny_tokenizer
) -> None:
    """Task documents rendered with the chat template, packed without splitting: every document
    lies whole in one row, its tokens are the template's prompt then the answer and EOS, and the
    completion column marks exactly the answer and EOS."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    cfg = PipelineConfig.model_validate(
        {
            "name": "chattest",
            "tokenizer": {"source": str(tmp_path / "tok")},
            "data": {
                "seq_len": SEQ_LEN,
                "split_documents": False,
                "pretrain": [{"type": "task", "examples": 300, "format": "chat"}],
            },
            "stages": [{"stage": "ar_pretrain", "tokens": 1000}],
            "storage": {"root": str(tmp_path / "runs")},
        }
    )
    fs, root = storage_root(cfg.storage)
    tok_path = prepare_tokenizer(cfg, fs, f"{root}/chattest")
    rows = packed_rows(pack_pretraining(cfg, fs, f"{root}/chattest", tok_path), fs)
    keys = [int(k) for r in rows for k in r["segment_keys"]]
    assert len(keys) == len(set(keys)) == 300  # no document cut across rows
    assert len(rows) > 300 * 20 // SEQ_LEN  # rows end in padding rather than cut a document
    eos = tiny_tokenizer.eos_token_id
    for r in rows:
        ids, docs, completion = (np.asarray(r[c]) for c in ("input_ids", "doc_ids", "completion"))
        for seg, key in enumerate(r["segment_keys"]):
            ex = tasks.example(0, int(key) & 0xFFFFFFFF, "train", cfg.data.task)
            prompt = prompt_ids(tiny_tokenizer, [{"role": "user", "content": ex.prompt}])
            answer = [*tiny_tokenizer(ex.answer, add_special_tokens=False)["input_ids"], eos]
            assert ids[docs == seg].tolist() == prompt + answer
            assert completion[docs == seg].tolist() == [False] * len(prompt) + [True] * len(answer)
        assert not completion[docs == len(r["segment_keys"])].any()  # padding
