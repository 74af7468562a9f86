"""Turning raw corpus files into documents, counting every row that cannot be one. No Ray here.

Each file is parsed whole (text / JSONL / Parquet) into records `{key, text, error}`. A record
with an error carries the reason and where it came from; the pipeline counts those by reason, or
stops at the first one under policy `fail`. Keys are global and ordered:
(source << 52) | (file << 32) | row, so documents keep the corpus order.
"""

from __future__ import annotations

import io
import json
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

Reason = Literal[
    "non_utf8", "empty", "too_long", "invalid_json", "missing_field", "wrong_type", "unreadable"
]
REASONS: tuple[Reason, ...] = Reason.__args__  # type: ignore[attr-defined]


class BadRowError(ValueError):
    """A bad row under policy `fail`; the message names the file, the row and the reason."""


def document_key(source: int, file: int, row: int) -> int:
    return (source << 52) | (file << 32) | row


def _record(key: int, text: str | None, error: Reason | None, where: str) -> dict:
    return {"key": key, "text": text, "error": error, "where": where, "prompt_chars": 0}


def _check_text(text: object, max_chars: int) -> Reason | None:
    if not isinstance(text, str):
        return "wrong_type"
    if not text.strip():
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    return None


def parse_file(
    data: bytes,
    *,
    path: str,
    source: int,
    file: int,
    fmt: Literal["text", "jsonl", "parquet"],
    field: str,
    text_unit: Literal["file", "line"],
    max_chars: int,
) -> list[dict]:
    """All records of one file, in order; bad rows are records with `error` set."""

    def rec(row: int, text: object, error: Reason | None = None) -> dict:
        error = error or _check_text(text, max_chars)
        return _record(
            document_key(source, file, row), None if error else text, error, f"{path} row {row}"
        )

    if fmt == "text" and text_unit == "file":
        try:
            return [rec(0, data.decode("utf-8"))]
        except UnicodeDecodeError:
            return [rec(0, None, "non_utf8")]
    if fmt in ("text", "jsonl"):
        records = []
        for row, raw in enumerate(data.splitlines()):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                records.append(rec(row, None, "non_utf8"))
                continue
            if fmt == "text":
                records.append(rec(row, line))
                continue
            if not line.strip():
                records.append(rec(row, None, "empty"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                records.append(rec(row, None, "invalid_json"))
                continue
            if not isinstance(obj, dict) or field not in obj:
                records.append(rec(row, None, "missing_field"))
            else:
                records.append(rec(row, obj[field]))
        return records
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError):
        return [rec(0, None, "unreadable")]
    if field not in table.column_names:
        return [rec(row, None, "missing_field") for row in range(max(table.num_rows, 1))]
    return [rec(row, text) for row, text in enumerate(table.column(field).to_pylist())]
