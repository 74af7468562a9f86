"""Checkpoints in storage: trainer state per rank, committed by a manifest.

A checkpoint directory holds:
  config.json            the model's HF config (rank 0), so a resume can build the model
  dcp/model, dcp/optim   torch.distributed.checkpoint shards: each rank writes only its own
  deepspeed/             or DeepSpeed's native ZeRO checkpoint (each rank its own files)
  model.safetensors, tokenizer files
                         the HF export, at a run's final checkpoint only (merge, export, serving)
  manifest.json          written last by rank 0: the run's position, validation loss, the data
                         it read, and the size and sha256 of every file, from every rank.

A checkpoint counts as written when its manifest reads and every listed file is there with its
size (`committed`: metadata only, nothing downloaded). Contents are checked by sha256 when a file
is read: `fetch` downloads only the files asked for, and `train.shards.ShardReader` only the
DCP shards a rank's load plan touches. Ray Train uploads the directories (named
`checkpoint_<step>`) and keeps the top-k by validation loss plus the latest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
PREFIX = "checkpoint_"
DCP_MODEL = "dcp/model"
DCP_OPTIM = "dcp/optim"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or does not match its manifest."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def model_file(rel: str) -> bool:
    """The HF export's files (weights, config, tokenizer) sit at the top; trainer state below."""
    return "/" not in rel


def has_dcp_model(manifest: dict) -> bool:
    """Whether a checkpoint holds DCP weight shards (a training run's); else its weights are
    only an HF export (the merged model)."""
    return any(rel.startswith(f"{DCP_MODEL}/") for rel in manifest["files"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_files(directory: Path) -> dict[str, dict]:
    """Relative path → {bytes, sha256} of every file under `directory` but the manifest."""
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            out[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def write_manifest(directory: Path, files: dict[str, dict], meta: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps({**meta, "files": files}, indent=2))


def read_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as stream:
            manifest = json.loads(stream.read())
        return manifest if isinstance(manifest.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def committed(fs: pafs.FileSystem, path: str) -> dict | None:
    """The manifest, if it reads and every file it lists is in storage with its size."""
    manifest = read_manifest(fs, path)
    if manifest is None:
        return None
    listed = manifest["files"]
    try:
        infos = fs.get_file_info([f"{path}/{rel}" for rel in listed])
    except OSError:
        return None
    for info, (rel, expected) in zip(infos, listed.items(), strict=True):
        if info.type != pafs.FileType.File or info.size != expected["bytes"]:
            log.warning("checkpoint %s: %s is missing or has the wrong size", path, rel)
            return None
    return manifest


def _check(local: Path, rel: str, expected: dict) -> None:
    if not local.is_file() or _sha256(local) != expected["sha256"]:
        raise CheckpointError(f"{local}: {rel} does not match its manifest (corrupt or changed)")


def get_file(fs: pafs.FileSystem, path: str, rel: str, manifest: dict, into: Path | None) -> Path:
    """One listed file, checked against its sha256: in place on a local filesystem, else copied
    into `into` first. A full local disk is an error of its own, not a torn checkpoint."""
    expected = manifest["files"].get(rel)
    if expected is None:
        raise CheckpointError(f"{path}: {rel} is not listed in its manifest")
    if into is None:
        local = Path(path) / rel
    else:
        local = into / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with fs.open_input_stream(f"{path}/{rel}") as src, local.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(err.errno, f"no space left to fetch {path}/{rel} to {local}") from err
            raise CheckpointError(f"{path}/{rel} could not be read: {err}") from err
    _check(local, rel, expected)
    return local


@dataclass(frozen=True)
class Fetched:
    """Files of a checkpoint, checked, readable under `local` (a temp copy when remote)."""

    path: str  # in storage
    local: Path
    manifest: dict
    _temp: str | None = None

    def cleanup(self) -> None:
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)


def fetch(
    fs: pafs.FileSystem, path: str, select: Callable[[str], bool] = model_file
) -> Fetched | None:
    """The selected files of the committed checkpoint at `path` (by default its HF export), each
    checked against its sha256; None if it is torn (uncommitted, or a file does not match)."""
    manifest = committed(fs, path)
    if manifest is None:
        return None
    remote = not isinstance(fs, pafs.LocalFileSystem)
    temp = tempfile.mkdtemp(prefix="llada-ckpt-") if remote else None
    try:
        for rel in manifest["files"]:
            if select(rel):
                get_file(fs, path, rel, manifest, Path(temp) if temp else None)
    except CheckpointError as err:
        log.warning("checkpoint %s: %s", path, err)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        return None
    return Fetched(path, Path(temp) if temp else Path(path), manifest, temp)


def list_checkpoints(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """Checkpoint directories of a run, newest (highest step) first."""
    info = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    names = [i.base_name for i in info if i.type == pafs.FileType.Directory]
    return [f"{run_path}/{n}" for n in sorted(n for n in names if n.startswith(PREFIX))][::-1]


def latest(fs: pafs.FileSystem, run_path: str) -> tuple[str, dict] | None:
    """(path, manifest) of the newest committed checkpoint of a run; torn ones are skipped."""
    for path in list_checkpoints(fs, run_path):
        manifest = committed(fs, path)
        if manifest is not None:
            return path, manifest
        log.warning("skipping checkpoint %s: not committed", path)
    return None


def read_manifests(fs: pafs.FileSystem, run_path: str) -> list[tuple[str, dict]]:
    """(path, manifest) of each checkpoint whose manifest is readable; files not checked."""
    out = []
    for path in list_checkpoints(fs, run_path):
        manifest = read_manifest(fs, path)
        if manifest is not None:
            out.append((path, manifest))
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
