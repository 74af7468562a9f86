"""Corpus sources as Ray Datasets of documents, and the tokenizer every data stage shares.

Sources are files (text / JSONL / Parquet, local or s3://) or the built-in verifiable task. Files
are listed on the driver in a fixed order and parsed whole by Ray tasks, so every record gets a
global, ordered key and every bad row is kept as a record with its reason, to be counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from tokenizers import Tokenizer

from llada_ray.config import (
    DataSource,
    FileSource,
    PipelineConfig,
    StorageConfig,
    TaskConfig,
    TaskSource,
)
from llada_ray.data import tasks
from llada_ray.data.documents import BadRowError, document_key, parse_file
from llada_ray.storage import filesystem_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

UNITS_PER_BATCH = 4  # work units (files, task ranges) per batch inside a task
# Listing blocks hold ≤ ~32 MB of files each, and there are ≥ 4 per CPU, so that files of
# uneven size still spread evenly over the tokenizer actors.
BYTES_PER_BLOCK = 32 << 20


def _blocks_for(units: int, total_bytes: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    by_size = -(-total_bytes // BYTES_PER_BLOCK)
    return max(1, min(units, max(4 * cpus, by_size)))


def list_files(
    source: FileSource, storage: StorageConfig
) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The source's files in a fixed (sorted) order; a path that matches nothing is an error."""
    fs, path = filesystem_for(source.path, storage)
    if isinstance(fs, pafs.LocalFileSystem) and glob.has_magic(path):
        infos = fs.get_file_info(sorted(glob.glob(path, recursive=True)))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        else:
            infos = [info]
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    if not files:
        raise FileNotFoundError(f"data source {source.path!r} matches no file")
    return fs, files


def source_digest(sources: list[DataSource], storage: StorageConfig) -> str:
    """Identity of the inputs: file paths, sizes and modification times, or the task's seed."""
    h = hashlib.sha256()
    for source in sources:
        h.update(source.model_dump_json().encode())
        if isinstance(source, FileSource):
            for info in list_files(source, storage)[1]:
                h.update(f"{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return h.hexdigest()


RECORD_SCHEMA = pa.schema(
    [
        ("key", pa.int64()),
        ("text", pa.large_string()),
        ("error", pa.string()),
        ("where", pa.string()),
        ("prompt_chars", pa.int32()),  # leading characters that are context, not completion
    ]
)
TASK_EXAMPLES_PER_UNIT = 2048


def task_examples(
    source: TaskSource, settings: TaskConfig, start: int = 0, stop: int | None = None
) -> Iterator[tasks.Example]:
    """Examples [start, stop) of a task source, lazily: always from the train split."""
    stop = source.examples if stop is None else stop
    return (tasks.example(source.seed, i, "train", settings) for i in range(start, stop))


def _task_records(
    source: TaskSource,
    settings: TaskConfig,
    index: int,
    start: int,
    stop: int,
    kind: str,
    tokenizer: PreTrainedTokenizerBase | None,
) -> list[dict]:
    records = []
    for i, ex in enumerate(task_examples(source, settings, start, stop), start):
        prompt_chars = 0
        if kind == "pretrain":
            text, prompt_chars = pretraining_document(ex, tokenizer, source.format)
        else:
            text = json.dumps(tasks.chat(ex) if kind == "sft" else tasks.preference(ex))
        records.append(
            {
                "key": document_key(index, 0, i),
                "text": text,
                "error": None,
                "where": f"task seed {source.seed} example {i}",
                "prompt_chars": prompt_chars,
            }
        )
    return records


def pretraining_document(
    ex: tasks.Example, tokenizer: PreTrainedTokenizerBase | None, fmt: str
) -> tuple[str, int]:
    """(text, prompt characters) of a task example as a pre-training document: `prompt answer`,
    or the chat template's rendering of the question with the answer after it (packing appends
    EOS, as the template ends a turn). The prompt is context for a completion-only loss."""
    if fmt == "text":
        return tasks.pretraining_text(ex), len(ex.prompt)
    assert tokenizer is not None, "chat-format task documents need the run's tokenizer"
    messages = [{"role": "user", "content": ex.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt + ex.answer, len(prompt)


def _parse_units(
    batch: dict,
    *,
    sources: list[DataSource],
    filesystems: dict[int, pafs.FileSystem],
    task: TaskConfig,
    kind: str,
    max_chars: int,
    fail: bool,
    tokenizer: PreTrainedTokenizerBase | None,
) -> pa.Table:
    """Records of a batch of work units: files to parse, or ranges of task examples."""
    records: list[dict] = []
    for index, path, file, start, stop in zip(
        batch["source"], batch["path"], batch["file"], batch["start"], batch["stop"], strict=True
    ):
        source = sources[int(index)]
        if isinstance(source, TaskSource):
            records += _task_records(
                source, task, int(index), int(start), int(stop), kind, tokenizer
            )
        else:
            records += _parse_one(
                filesystems[int(index)], str(path), source, int(index), int(file), max_chars
            )
    if fail:
        bad = next((r for r in records if r["error"]), None)
        if bad:
            raise BadRowError(f"bad row ({bad['error']}) at {bad['where']}")
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def read_records(
    sources: list[DataSource],
    cfg: PipelineConfig,
    kind: str = "pretrain",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ray.data.Dataset:
    """One Dataset of {key, text, error, where, prompt_chars} over all sources, in source order.

    All sources become one list of work units (a file, or a range of task examples) read by a
    single map, which Ray Data fuses into the consuming actor: no read task ever waits for a CPU
    that the actor pool holds. For `kind` sft / dpo, `text` is each sample's JSON (files are
    read as JSON lines). `tokenizer` renders chat-format task documents.
    """
    units: list[dict] = []
    filesystems: dict[int, pafs.FileSystem] = {}
    as_read = []
    total_bytes = 0
    for index, source in enumerate(sources):
        if isinstance(source, FileSource) and kind != "pretrain":  # chats: whole JSON lines
            source = source.model_copy(update={"format": "text", "text_unit": "line"})
        as_read.append(source)
        if isinstance(source, TaskSource):
            for start in range(0, source.examples, TASK_EXAMPLES_PER_UNIT):
                stop = min(start + TASK_EXAMPLES_PER_UNIT, source.examples)
                units.append(
                    {"source": index, "path": "", "file": -1, "start": start, "stop": stop}
                )
            continue
        filesystems[index], files = list_files(source, cfg.storage)
        total_bytes += sum(f.size for f in files)
        units += [
            {"source": index, "path": f.path, "file": i, "start": 0, "stop": 0}
            for i, f in enumerate(files)
        ]
    return ray.data.from_items(
        units, override_num_blocks=_blocks_for(len(units), total_bytes)
    ).map_batches(
        _parse_units,
        fn_kwargs={
            "sources": as_read,
            "filesystems": filesystems,
            "task": cfg.data.task,
            "kind": kind,
            "max_chars": cfg.data.max_document_chars,
            "fail": cfg.data.bad_rows == "fail",
            "tokenizer": tokenizer,
        },
        batch_size=UNITS_PER_BATCH,
        batch_format="numpy",
    )


def iter_texts(sources: list[DataSource], cfg: PipelineConfig, max_chars: int) -> Iterator[str]:
    """Clean documents in corpus order on the driver, up to `max_chars` (tokenizer training)."""
    seen = 0
    for index, source in enumerate(sources):
        if isinstance(source, TaskSource):
            texts = map(tasks.pretraining_text, task_examples(source, cfg.data.task))
        else:
            fs, files = list_files(source, cfg.storage)
            texts = (
                r["text"]
                for file, info in enumerate(files)
                for r in _parse_one(fs, info.path, source, index, file, cfg.data.max_document_chars)
                if r["error"] is None
            )
        for text in texts:
            yield text
            seen += len(text)
            if seen >= max_chars:
                return


def _parse_one(
    fs: pafs.FileSystem, path: str, source: FileSource, index: int, file: int, max_chars: int
) -> list[dict]:
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    return parse_file(
        data,
        path=path,
        source=index,
        file=file,
        fmt=source.format,
        field=source.field,
        text_unit=source.text_unit,
        max_chars=max_chars,
    )


# --- the tokenizer ----------------------------------------------------------------------------


def prepare_tokenizer(cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str) -> str:
    """The run's tokenizer, saved under `<run>/tokenizer` (trained here for source: train).

    Every data stage and worker loads this one copy, so they agree token for token. Reused when
    already there.
    """
    from transformers import AutoTokenizer

    from llada_ray.model.tiny import train_tokenizer

    target = f"{run_root}/tokenizer"
    if fs.get_file_info(f"{target}/tokenizer_config.json").type == pafs.FileType.File:
        return target
    if cfg.tokenizer.source == "train":
        tokenizer = train_tokenizer(
            iter_texts(cfg.data.pretrain, cfg, cfg.tokenizer.train_chars), cfg.tokenizer.vocab_size
        )
    else:
        source = cfg.model.source if cfg.tokenizer.source == "model" else cfg.tokenizer.source
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=cfg.model.trust_remote_code
        )
        if tokenizer.mask_token is None:
            tokenizer.add_special_tokens({"mask_token": cfg.model.mask_token})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    with tempfile.TemporaryDirectory() as local:
        tokenizer.save_pretrained(local)
        fs.create_dir(target)
        pafs.copy_files(local, target, destination_filesystem=fs)
    return target


def load_tokenizer(fs: pafs.FileSystem, path: str) -> PreTrainedTokenizerBase:
    """Load the run's tokenizer from storage (copied to a local temp dir when remote)."""
    from transformers import AutoTokenizer

    if isinstance(fs, pafs.LocalFileSystem):
        return AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as local:
        pafs.copy_files(path, local, source_filesystem=fs)
        return AutoTokenizer.from_pretrained(local)


def tokenizer_digest(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        info = fs.get_file_info(f"{path}/{name}")
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                h.update(stream.read())
    return h.hexdigest()


@dataclass(frozen=True)
class Encoder:
    """The run's tokenizer as the `tokenizers` library sees it: what packing workers need.

    Importing transformers costs a Ray worker seconds; `tokenizers` encodes identically (it is
    what a fast HF tokenizer runs) and loads in milliseconds.
    """

    tokenizer: Tokenizer
    eos_id: int
    pad_id: int

    def encode(self, texts: list[str], prompt_chars: list[int]) -> list[tuple[list[int], int]]:
        """Token ids of each text and how many of them start inside its prompt (its first
        `prompt_chars` characters; the character offsets are the tokenizer's own)."""
        out = []
        for e, chars in zip(
            self.tokenizer.encode_batch(texts, add_special_tokens=False), prompt_chars, strict=True
        ):
            n_prompt = sum(start < chars for start, _ in e.offsets)
            out.append((e.ids, n_prompt))
        return out


def load_encoder(fs: pafs.FileSystem, path: str) -> Encoder:
    def read(name: str) -> bytes:
        try:
            with fs.open_input_stream(f"{path}/{name}") as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}/{name} not found: packing needs a fast tokenizer (tokenizer.json)"
            ) from None

    tokenizer = Tokenizer.from_str(read("tokenizer.json").decode())
    config = json.loads(read("tokenizer_config.json"))

    def token_id(name: str) -> int | None:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return tokenizer.token_to_id(token) if token else None

    eos = token_id("eos_token")
    if eos is None:
        raise ValueError(f"tokenizer at {path} has no EOS token: documents need one appended")
    pad = token_id("pad_token")
    return Encoder(tokenizer, eos, eos if pad is None else pad)
