"""Corpus parsing, SFT / DPO rows and the task family, without Ray."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llada_ray.data import tasks
from llada_ray.data.chat import ChatError, dpo_row, sft_row
from llada_ray.data.documents import parse_file


def parse(data: bytes, fmt: str = "jsonl", unit: str = "line", max_chars: int = 1000) -> list:
    return parse_file(
        data, path="f", source=0, file=0, fmt=fmt, field="text", text_unit=unit, max_chars=max_chars
    )


def test_each_bad_row_kind_gets_its_reason() -> None:
    lines = [
        json.dumps({"text": "fine"}).encode(),
        b'{"text": "caf\xe9"}',  # latin-1 byte: not UTF-8
        json.dumps({"text": "   "}).encode(),
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "x" * 2000}).encode(),
        b"{not json",
        b"",  # a blank line between documents
        json.dumps({"text": "last"}).encode(),
    ]
    got = [r["error"] for r in parse(b"\n".join(lines))]
    assert got == [
        None,
        "non_utf8",
        "empty",
        "missing_field",
        "wrong_type",
        "too_long",
        "invalid_json",
        "empty",
        None,
    ]
    records = parse(b"\n".join(lines))
    assert records[2]["where"] == "f row 2" and records[0]["text"] == "fine"
    assert [r["key"] for r in records] == sorted(r["key"] for r in records)


def test_text_and_parquet_files() -> None:
    assert parse(b"\xff\xfe", fmt="text", unit="file")[0]["error"] == "non_utf8"
    assert parse(b"a\n\nb", fmt="text")[1]["error"] == "empty"
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["one", None, ""]}), buf)
    assert [r["error"] for r in parse(buf.getvalue(), fmt="parquet")] == [
        None,
        "wrong_type",
        "empty",
    ]
    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["x", "y"]}), buf)
    assert {r["error"] for r in parse(buf.getvalue(), fmt="parquet")} == {"missing_field"}
    assert parse(b"not parquet", fmt="parquet")[0]["error"] == "unreadable"


@pytest.mark.parametrize("block", [8, 32])
def test_sft_rows_mask_only_the_response(tiny_tokenizer, block: int) -> None:
    sample = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Add: 2 + 2 ="},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Add: 3 + 3 ="},
            {"role": "assistant", "content": "6"},
        ]
    }
    row = sft_row(sample, tiny_tokenizer, block, 512)
    assert len(row.input_ids) % block == 0
    prompt = tiny_tokenizer.decode(row.input_ids[: row.prompt_len])
    response = tiny_tokenizer.decode(row.input_ids[row.prompt_len :])
    assert prompt.endswith("<|assistant|>") and "4" in prompt  # earlier turns are prompt
    assert response.startswith("6") and response.endswith(tiny_tokenizer.eos_token)
    assert row.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_sft_and_dpo_refusals(tiny_tokenizer) -> None:
    with pytest.raises(ChatError) as err:
        sft_row({"messages": [{"role": "user", "content": "hi"}]}, tiny_tokenizer, 8, 512)
    assert err.value.reason == "no_response"
    with pytest.raises(ChatError) as err:
        sft_row({"text": "x"}, tiny_tokenizer, 8, 512)
    assert err.value.reason == "missing_field"
    long = {
        "messages": [{"role": "user", "content": "a " * 500}, {"role": "assistant", "content": "b"}]
    }
    with pytest.raises(ChatError) as err:
        sft_row(long, tiny_tokenizer, 8, 64)
    assert err.value.reason == "too_long"
    with pytest.raises(ChatError) as err:
        dpo_row({"prompt": 3, "chosen": "a", "rejected": "b"}, tiny_tokenizer, 8, 512)
    assert err.value.reason == "wrong_type"


def test_dpo_rows_align_both_responses(tiny_tokenizer) -> None:
    pair = tasks.preference(tasks.example(0, 5, "train"))
    row = dpo_row(pair, tiny_tokenizer, 16, 512)
    for side in (row.chosen_ids, row.rejected_ids):
        assert (len(row.prompt_ids) + len(side)) % 16 == 0
    assert tiny_tokenizer.decode(row.chosen_ids).startswith(pair["chosen"])
    assert tiny_tokenizer.decode(row.rejected_ids).startswith(pair["rejected"])
    messages = dpo_row(
        {
            "prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": pair["rejected"],
        },
        tiny_tokenizer,
        16,
        512,
    )
    assert messages == row


def test_task_family_is_deterministic_and_graded_exactly() -> None:
    a, b = tasks.examples(7, 0, 200, "train"), tasks.examples(7, 0, 200, "train")
    assert a == b and a != tasks.examples(8, 0, 200, "train")
    assert {ex.task for ex in a} == set(tasks.DEFAULT.kinds)
    assert all(ex.answer != ex.wrong for ex in a)
    perfect = tasks.score(a, [ex.answer for ex in a])
    assert perfect["accuracy"] == 1.0
    assert tasks.score(a, [ex.wrong for ex in a])["accuracy"] == 0.0
    assert perfect["similarity"] == 1.0
    assert 0.5 < tasks.score(a, [ex.wrong for ex in a])["similarity"] < 1.0  # near misses
    assert tasks.score(a, [""] * len(a))["similarity"] == 0.0
    half = tasks.score(a[:2], [a[0].answer + " ", "nonsense"])
    assert half["accuracy"] == 0.5
