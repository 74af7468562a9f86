"""Where runs keep their outputs in storage, and whether they finished: manifests only.

Layout under `<storage.root>/<pipeline>/`:
  train/<group>/<run>/checkpoint_<step>   a run's checkpoints; a group is one Ray Train run
  models/merge/                           the merged CPT checkpoint
"""

from __future__ import annotations

import pyarrow.fs as pafs

from llada_ray.config import PipelineConfig
from llada_ray.storage import storage_root
from llada_ray.train import checkpoint
from llada_ray.train.plan import Unit, input_unit


def pipeline_root(cfg: PipelineConfig) -> tuple[pafs.FileSystem, str]:
    fs, root = storage_root(cfg.storage)
    return fs, f"{root}/{cfg.name}"


def run_path(run_root: str, unit: Unit) -> str:
    return f"{run_root}/train/{unit.run_dir}"


def merge_path(run_root: str) -> str:
    return f"{run_root}/models/merge"


def finished(fs: pafs.FileSystem, run_root: str, unit: Unit) -> tuple[str, dict] | None:
    """(path, manifest) of a run's committed final checkpoint, or None if it has not finished.
    Manifests and file sizes only: nothing is downloaded."""
    if unit.objective == "merge":
        manifest = checkpoint.committed(fs, merge_path(run_root))
        return (merge_path(run_root), manifest) if manifest else None
    found = checkpoint.latest(fs, run_path(run_root, unit))
    return found if found is not None and found[1].get("final") else None


def output_of(fs: pafs.FileSystem, run_root: str, unit: Unit) -> checkpoint.Fetched | None:
    """The model a finished run produced (its HF export, checked), or None."""
    done = finished(fs, run_root, unit)
    return checkpoint.fetch(fs, done[0]) if done else None


def input_of(
    cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str, unit: Unit
) -> tuple[str, dict] | None:
    """(path, manifest) of the output `unit` starts from; None: it starts from model.source."""
    before = input_unit(cfg, unit)
    if before is None:
        return None
    done = finished(fs, run_root, before)
    if done is None:
        raise RuntimeError(
            f"run {unit.name!r} starts from {before.name!r}, which has not finished: run it first"
        )
    return done
