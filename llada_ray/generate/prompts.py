"""Prompt files → prompt rows → candidate rows: what the teacher is asked, `sampling.n` times.

A bad line is not an error of the job: its row keeps the reason (`error`) for the report and goes
no further.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data.expressions import col

from llada_ray.config import FileSource
from llada_ray.data.corpus import list_files
from llada_ray.data.documents import parse_file
from llada_ray.generate.config import GenerateConfig, GenerateError

MAX_LINE_CHARS = 10_000_000  # a longer prompt line is a bad row (too_long), as in packing

PROMPT_SCHEMA = pa.schema(
    [
        ("key", pa.int64()),  # documents.document_key: file order, then row order
        ("chat", pa.string()),  # the prompt's messages as JSON, ending with a user turn
        ("answer", pa.string()),  # reference answer for the correctness scorer, or null
        ("task", pa.string()),
        ("error", pa.string()),  # why the row is no prompt, or null
        ("where", pa.string()),
    ]
)
# What the teachers are given: one row per candidate, a prompt's candidates next to each other.
CANDIDATE_SCHEMA = pa.schema(
    [
        ("key", pa.int64()),
        ("candidate", pa.int32()),
        ("sample_seed", pa.int64()),
        ("chat", pa.string()),
        ("answer", pa.string()),
        ("task", pa.string()),
    ]
)


class PromptError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PromptError("wrong_type")
    out = []
    for m in value:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise PromptError("wrong_type")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_prompt(line: str) -> tuple[list[dict], str | None, str | None]:
    """(messages, answer, task) of one JSONL row; PromptError(reason) if it holds no prompt.

    A row has `prompt` (a string or messages) or `messages`. Trailing assistant turns are
    dropped, so an SFT chat file doubles as a prompt set; what is left must end with a user turn.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise PromptError("invalid_json") from None
    if not isinstance(obj, dict) or not ({"prompt", "messages"} & obj.keys()):
        raise PromptError("missing_field")
    value = obj["messages"] if "messages" in obj else obj["prompt"]
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    messages = _check_messages(value)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise PromptError("no_prompt")
    answer, task = obj.get("answer"), obj.get("task")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)  # {"answer": 42} is the answer "42"
    if not all(v is None or isinstance(v, str) for v in (answer, task)):
        raise PromptError("wrong_type")
    return messages, answer, task


def _prompt_record(line: dict) -> dict:
    """A line record of documents.parse_file as a PROMPT_SCHEMA row."""
    out = {**line, "chat": None, "answer": None, "task": None}
    del out["text"]
    if line["error"]:
        return out
    try:
        messages, out["answer"], out["task"] = parse_prompt(line["text"])
    except PromptError as err:
        out["error"] = err.reason
        return out
    out["chat"] = json.dumps(messages, ensure_ascii=False)
    return out


def _read_prompt_files(batch: dict[str, np.ndarray], *, fs: pafs.FileSystem) -> pa.Table:
    records = []
    for file, path in zip(batch["file"], batch["path"], strict=True):
        with fs.open_input_stream(str(path)) as stream:
            data = stream.read()
        lines = parse_file(
            data,
            path=str(path),
            source=0,
            file=int(file),
            fmt="text",
            field="text",
            text_unit="line",
            max_chars=MAX_LINE_CHARS,
        )
        records += [_prompt_record(r) for r in lines]
    return pa.Table.from_pylist(records, schema=PROMPT_SCHEMA)


def input_files(cfg: GenerateConfig) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The prompt files, sorted; a GenerateError naming `input` when there are none."""
    try:
        return list_files(FileSource(path=cfg.input, format="jsonl"), cfg.storage)
    except FileNotFoundError as err:
        raise GenerateError(f"input: {err}") from None


def read_prompts(fs: pafs.FileSystem, files: list[pafs.FileInfo]) -> ray.data.Dataset:
    """One row per input line (PROMPT_SCHEMA), in file and line order; a file per read task."""
    units = [{"file": i, "path": f.path} for i, f in enumerate(files)]
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _read_prompt_files, fn_kwargs={"fs": fs}, batch_size=1, batch_format="numpy"
    )


def sample_seed(seed: int, key: int, candidate: int) -> int:
    """The seed of one candidate: a pure function of the config's seed and the row."""
    digest = hashlib.sha256(f"{seed}:{key}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # non-negative int64 (torch, vLLM)


def expand_candidates(batch: pa.Table, *, n: int, seed: int) -> pa.Table:
    """Each prompt row → n candidate rows (CANDIDATE_SCHEMA), next to each other."""
    rows = []
    for row in batch.select(["key", "chat", "answer", "task"]).to_pylist():
        for c in range(n):
            rows.append({**row, "candidate": c, "sample_seed": sample_seed(seed, row["key"], c)})
    return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)


def candidate_rows(prompts: ray.data.Dataset, cfg: GenerateConfig) -> ray.data.Dataset:
    """The good prompt rows as candidate rows, in blocks of one generate batch each (so every
    teacher replica gets work)."""
    s = cfg.sampling
    return (
        prompts.filter(expr=col("error").is_null())
        .map_batches(
            expand_candidates, fn_kwargs={"n": s.n, "seed": s.seed}, batch_format="pyarrow"
        )
        .repartition(target_num_rows_per_block=cfg.batch_size)
    )
