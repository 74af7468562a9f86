"""Where a job writes: its output directory, checked against the input before any generation,
and the `part-NNNNN.jsonl` files of the records."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.fs as pafs

from llada_ray.generate.config import GenerateConfig, GenerateError
from llada_ray.generate.prompts import input_files
from llada_ray.storage import filesystem_for

ROWS_PER_FILE = 10_000


@dataclass(frozen=True)
class Paths:
    input_fs: pafs.FileSystem
    inputs: list[pafs.FileInfo]
    output_fs: pafs.FileSystem
    output: str


def check_paths(cfg: GenerateConfig) -> Paths:
    """The input files and the output directory, checked before any generation runs."""
    input_fs, inputs = input_files(cfg)
    output_fs, output = prepare_output(cfg)
    if type(input_fs) is type(output_fs) and any(
        f.path.startswith(f"{output}/") for f in inputs
    ):  # overwrite would delete them, and the next run would read its own output as prompts
        raise GenerateError(f"output: {cfg.output} holds input files; write somewhere else")
    return Paths(input_fs, inputs, output_fs, output)


def prepare_output(cfg: GenerateConfig) -> tuple[pafs.FileSystem, str]:
    """The output directory; GenerateError naming `output` if it holds files and may not be
    replaced (emptied only once generation runs)."""
    fs, path = filesystem_for(cfg.output, cfg.storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise GenerateError(f"output: {cfg.output} is a file; give a directory")
    if info.type == pafs.FileType.Directory and not cfg.overwrite:
        held = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if any(i.type == pafs.FileType.File for i in held):
            raise GenerateError(
                f"output: {cfg.output} already holds files; set overwrite: true to replace them"
            )
    return fs, path


def open_writer(paths: Paths, *, overwrite: bool) -> JsonlParts:
    """A writer into the output directory, which is created, or emptied first if `overwrite`."""
    if overwrite:
        paths.output_fs.delete_dir_contents(paths.output, missing_dir_ok=True)
    paths.output_fs.create_dir(paths.output, recursive=True)
    return JsonlParts(paths.output_fs, paths.output)


class JsonlParts:
    """`part-NNNNN.jsonl` files of up to `rows_per_file` records under a directory (local/S3)."""

    def __init__(self, fs: pafs.FileSystem, path: str, rows_per_file: int = ROWS_PER_FILE) -> None:
        self.fs, self.path, self.rows_per_file = fs, path, rows_per_file
        self.buffer: list[bytes] = []
        self.files: list[str] = []
        self.rows = 0

    def write(self, record: dict) -> None:
        self.buffer.append(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.rows += 1
        if len(self.buffer) == self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.path}/part-{len(self.files):05d}.jsonl"
        with self.fs.open_output_stream(name) as out:
            out.write(b"".join(self.buffer))
        self.files.append(name)
        self.buffer = []
