"""Checkpoints in storage: HF weights + tokenizer + trainer state, committed by a manifest.

A checkpoint directory holds the model in Hugging Face layout (safetensors, config, tokenizer),
the optimizer state, and `manifest.json`: the run's position (step, samples, tokens), its
validation loss, and the size and sha256 of every other file, from every rank. The manifest is
written last; a checkpoint whose manifest is missing, unreadable or disagrees with any file is
never loaded: the newest one that verifies is used instead. Ray Train uploads the directories
(named `checkpoint_<step>`) and keeps the top-k by validation loss plus the latest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
PREFIX = "checkpoint_"
log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def describe_files(directory: Path) -> dict[str, dict]:
    """Relative path → {bytes, sha256} of every file under `directory` but the manifest."""
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[rel] = {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def write_manifest(directory: Path, files: dict[str, dict], meta: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps({**meta, "files": files}, indent=2))


def verify(directory: Path) -> dict | None:
    """The manifest of a local checkpoint directory if every file it lists matches, else None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = describe_files(directory)
    for rel, expected in listed.items():
        if present.get(rel) != expected:
            log.warning("checkpoint %s: %s is missing or corrupt", directory, rel)
            return None
    return manifest


@dataclass(frozen=True)
class Fetched:
    """A verified checkpoint, readable at `local` (a temp copy when the storage is remote)."""

    path: str  # in storage
    local: Path
    manifest: dict
    _temp: str | None = None

    def cleanup(self) -> None:
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)


def fetch(fs: pafs.FileSystem, path: str) -> Fetched | None:
    """Verify the checkpoint at `path` (copying it locally first if remote); None if torn."""
    if isinstance(fs, pafs.LocalFileSystem):
        manifest = verify(Path(path))
        return Fetched(path, Path(path), manifest) if manifest else None
    temp = tempfile.mkdtemp(prefix="llada-ckpt-")
    try:
        if fs.get_file_info(f"{path}/{MANIFEST}").type != pafs.FileType.File:
            raise FileNotFoundError(path)
        pafs.copy_files(path, temp, source_filesystem=fs)
        manifest = verify(Path(temp))
    except OSError:  # unreachable or half-deleted: treated as torn
        manifest = None
    if manifest is None:
        shutil.rmtree(temp, ignore_errors=True)
        return None
    return Fetched(path, Path(temp), manifest, temp)


def list_checkpoints(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """Checkpoint directories of a run, newest (highest step) first."""
    info = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    names = [i.base_name for i in info if i.type == pafs.FileType.Directory]
    return [f"{run_path}/{n}" for n in sorted(n for n in names if n.startswith(PREFIX))][::-1]


def latest(fs: pafs.FileSystem, run_path: str) -> Fetched | None:
    """The newest checkpoint of a run that verifies; torn ones are skipped with a warning."""
    for path in list_checkpoints(fs, run_path):
        fetched = fetch(fs, path)
        if fetched is not None:
            return fetched
        log.warning("skipping checkpoint %s: no valid manifest", path)
    return None


def read_manifests(fs: pafs.FileSystem, run_path: str) -> list[tuple[str, dict]]:
    """(path, manifest) of each checkpoint whose manifest is readable; files not verified."""
    out = []
    for path in list_checkpoints(fs, run_path):
        try:
            with fs.open_input_stream(f"{path}/{MANIFEST}") as stream:
                out.append((path, json.loads(stream.read())))
        except (OSError, ValueError):
            continue
    return out


def upload(local: Path, fs: pafs.FileSystem, dest: str) -> None:
    """Copy a checkpoint directory to storage, the manifest last (the commit point)."""
    if fs.get_file_info(dest).type != pafs.FileType.NotFound:
        fs.delete_dir(dest)
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST):
        target = f"{dest}/{path.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with path.open("rb") as src, fs.open_output_stream(target) as out:
            shutil.copyfileobj(src, out, 1 << 20)
    with fs.open_output_stream(f"{dest}/{MANIFEST}") as out:
        out.write((local / MANIFEST).read_bytes())
