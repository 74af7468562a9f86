"""Stage manifests: one JSON file per committed stage under `<run root>/pipeline/`.

A stage is committed when its manifest exists; the manifest is written after the stage's output
is complete and verified, so a crash at any point leaves either no manifest (the stage runs again,
resuming its checkpoints) or a whole one.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import pyarrow.fs as pafs

import llada_ray


def manifest_dir(run_root: str) -> str:
    return f"{run_root}/pipeline"


def read_all(fs: pafs.FileSystem, run_root: str) -> dict[str, dict]:
    """Committed stages by name."""
    selector = pafs.FileSelector(manifest_dir(run_root), allow_not_found=True)
    out = {}
    for info in fs.get_file_info(selector):
        if info.is_file and info.base_name.endswith(".json"):
            try:
                with fs.open_input_stream(info.path) as f:
                    manifest = json.loads(f.read())
            except OSError:  # deleted since listed (a --force-from run is forgetting)?
                # S3 says so only as the read's GetObject fails, after the open succeeded.
                if fs.get_file_info(info.path).type == pafs.FileType.NotFound:
                    continue
                raise
            out[manifest["stage"]] = manifest
    return out


def write(fs: pafs.FileSystem, run_root: str, manifest: dict) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(manifest_dir(run_root), recursive=True)
    path = f"{manifest_dir(run_root)}/{manifest['stage']}.json"
    # Local files: write beside, then rename (atomic); an S3 PUT is atomic by itself.
    temp = f"{path}.tmp" if isinstance(fs, pafs.LocalFileSystem) else path
    with fs.open_output_stream(temp) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    if temp != path:
        fs.move(temp, path)


def delete(fs: pafs.FileSystem, run_root: str, stage: str) -> None:
    path = f"{manifest_dir(run_root)}/{stage}.json"
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@cache
def code_version() -> dict:
    """The package version, and the git commit when the code runs from a checkout."""
    source = Path(llada_ray.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None  # an installed wheel, or a job's working-dir copy without .git
    return {"package": llada_ray.__version__, "git": commit}
