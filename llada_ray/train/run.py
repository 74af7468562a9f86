"""The driver side of a run: data, input checkpoint, MLflow, then a TorchTrainer (or the merge).

A group of consecutive runs trains in one TorchTrainer (see plan.Unit.trainer); storage layout in
train.outputs. A run starts from the output of the run before it in the plan: a training run's
final checkpoint, or the merged model. Submitting a finished run again trains nothing.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer

from llada_ray import tracking
from llada_ray.config import PipelineConfig
from llada_ray.data.pack import pack_all
from llada_ray.model.merge import HFWeights, merge_checkpoints
from llada_ray.train import checkpoint, shards
from llada_ray.train.loop import train_loop
from llada_ray.train.outputs import finished, input_of, merge_path, pipeline_root, run_path
from llada_ray.train.plan import Unit, phase_range, units


@dataclass(frozen=True)
class RunOutcome:
    unit: str
    output: str  # storage path of the run's output checkpoint
    manifest: dict
    trained: bool  # False when it was already done
    seconds: float
    started: float = 0.0  # unix time it began (a later CPT phase: inside the group's run)


def run_unit(cfg: PipelineConfig, unit: Unit, parent_run_id: str | None = None) -> RunOutcome:
    """Run one unit of the plan to completion (resuming it if it was interrupted)."""
    return run_units(cfg, [unit], parent_run_id)[0]


def run_units(
    cfg: PipelineConfig, group: list[Unit], parent_run_id: str | None = None
) -> list[RunOutcome]:
    """Run units of the plan to completion, in plan order, in one Ray Train run (one worker
    group): one unit, or consecutive units of one `Unit.trainer`. Finished units are skipped
    and an interrupted one resumes; each unit keeps its MLflow run and committed checkpoints."""
    started = time.time()
    fs, run_root = pipeline_root(cfg)
    if len({u.trainer for u in group}) > 1 or (len(group) > 1 and group[0].objective == "merge"):
        raise ValueError(f"these runs do not share a worker group: {[u.name for u in group]}")
    outcomes = []
    for unit in group:
        if (done := finished(fs, run_root, unit)) is None:
            break
        outcomes.append(RunOutcome(unit.name, *done, False, 0.0))
    todo = group[len(outcomes) :]
    if not todo:
        return outcomes
    first = todo[0]
    start = input_of(cfg, fs, run_root, first)
    init = start[0] if start else None
    if first.objective == "merge":
        mlflow_run = tracking.start_run(
            cfg, first.name, {"stage": first.stage.model_dump(mode="json")}, parent_run_id
        )
        manifest = merge_top_k(cfg, fs, run_root)
        tracking.finish_run(cfg, mlflow_run, manifest)
        seconds = time.time() - started
        return [RunOutcome(first.name, merge_path(run_root), manifest, True, seconds, started)]

    packed = pack_all(cfg, fs, run_root)
    data = {u.name: packed[u.data] for u in todo}
    written = {u.name: check_resumable(cfg, fs, run_root, u, data[u.name].digest) for u in todo}
    runs = {
        u.name: tracking.start_run(cfg, u.name, _params(cfg, u, init), parent_run_id) for u in todo
    }
    payload = {
        "config": cfg.model_dump(mode="json"),
        "units": [u.name for u in todo],
        "run_root": run_root,
        "tokenizer": f"{run_root}/tokenizer",
        "data": {name: {"path": d.path, "digest": d.digest} for name, d in data.items()},
        "tracking": {"uri": tracking.resolve_uri(cfg.tracking.uri), "runs": runs},
        "launched_at_step": {
            name: max((m.get("step", 0) for _, m in ms), default=0) for name, ms in written.items()
        },
    }
    scaling = cfg.scaling
    # Ray Train keeps the checkpoints with the best `keep` score (see loop._train): every
    # run's final one, and the top-k of the newest run by validation loss (for the group's last
    # run, the last CPT phase before the merge, with its own keep_top_k).
    members = [u for u in units(cfg) if u.trainer == first.trainer]
    last = members[-1].training
    assert last is not None
    keep = len(members) + last.keep_top_k
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=first.trainer,
            storage_path=f"{run_root}/train",
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep,
                checkpoint_score_attribute="keep",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )
    try:
        trainer.fit()  # raises TrainingFailedError once max_failures restarts are used up
    except Exception:
        for unit in todo:
            done = finished(fs, run_root, unit)
            tracking.finish_run(cfg, runs[unit.name], done and done[1], failed=done is None)
        raise
    for unit in todo:
        done = finished(fs, run_root, unit)
        if done is None:
            tracking.finish_run(cfg, runs[unit.name], None, failed=True)
            raise RuntimeError(f"run {unit.name!r} ended without a committed final checkpoint")
        tracking.finish_run(cfg, runs[unit.name], done[1])
        began = started if unit is first else done[1]["started"]
        outcomes.append(RunOutcome(unit.name, *done, True, done[1]["created"] - began, began))
    return outcomes


def _params(cfg: PipelineConfig, unit: Unit, init: str | None) -> dict:
    """MLflow params of a run; `init` is the first run's input (a later one's is in its group)."""
    return {
        "run": {
            "name": unit.name,
            "objective": unit.objective,
            "block_size": unit.block_size,
            "tokens": unit.tokens,
            "lr": unit.lr,
            "init": init if init is not None else unit.starts_from,
        },
        "stage": unit.stage.model_dump(mode="json", exclude={"phases"}),
        "scaling": cfg.scaling.model_dump(mode="json"),
        "model": cfg.model.source,
        "seq_len": cfg.data.seq_len,
        "seed": cfg.seed,
    }


def check_resumable(
    cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str, unit: Unit, data: str
) -> list[tuple[str, dict]]:
    """The run's checkpoint manifests so far, if the config can continue them. Refused here,
    before anything is submitted, naming the field: the data, the global batch and seq_len fix
    which sample each step takes; DCP checkpoints reshard to any world size, DeepSpeed's do not.
    """
    written = checkpoint.read_manifests(fs, run_path(run_root, unit))
    if not written:
        return written
    path, m = written[0]
    stage = unit.training
    assert stage is not None
    world = cfg.scaling.num_workers
    fmt = "deepspeed" if cfg.scaling.strategy == "deepspeed" else "dcp"
    now = {
        "data": data,
        "global_batch": stage.micro_batch_size * stage.grad_accumulation * max(world, 1),
        "seq_len": cfg.data.seq_len,
        "format": fmt,
    }
    if fmt == "deepspeed":
        now["world_size"] = world
    for field, value in now.items():
        if m.get(field) != value:
            raise RuntimeError(
                f"{path} was written with {field} {m.get(field)!r} and this config has "
                f"{value!r}: resume with the same {field}, or delete {run_path(run_root, unit)} "
                "to start the run over"
            )
    return written


def merge_top_k(cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str) -> dict:
    """Average the k checkpoints of the last CPT phase with the lowest validation loss.

    The last phase trains at the block size used for decoding, so its validation losses are
    comparable; its top-k (+ latest) are what Ray Train kept. Only their weights are read (DCP
    model shards, or an HF export): never the optimizer state.
    """
    plan = units(cfg)
    merge = next(u for u in plan if u.objective == "merge")
    last_cpt = [u for u in plan if u.objective in ("bd", "stable")][-1]
    candidates = [
        (m["val_loss"], path)
        for path, m in checkpoint.read_manifests(fs, run_path(run_root, last_cpt))
        if isinstance(m.get("val_loss"), float) and math.isfinite(m["val_loss"])
    ]
    done = finished(fs, run_root, last_cpt)
    like = checkpoint.fetch(fs, done[0]) if done else None
    if like is None:
        raise RuntimeError(f"{last_cpt.name!r} has no verified final checkpoint to merge into")
    opened: list = [like]
    chosen: list[tuple[str, dict]] = []
    try:
        sources = []
        for _, path in sorted(candidates):
            manifest = checkpoint.committed(fs, path)
            if manifest is None:
                continue
            if checkpoint.has_dcp_model(manifest):
                reader = shards.ShardReader(fs, path, manifest, checkpoint.DCP_MODEL)
                opened.append(reader)
                sources.append(shards.DcpWeights(reader))
            else:  # a final checkpoint's HF export (DeepSpeed runs have no DCP shards)
                fetched = checkpoint.fetch(fs, path)
                if fetched is None:
                    continue
                opened.append(fetched)
                sources.append(HFWeights(fetched.local))
            chosen.append((path, manifest))
            if len(chosen) == merge.stage.top_k:
                break
        with tempfile.TemporaryDirectory() as out:
            merge_checkpoints(sources, like.local, Path(out))
            manifest = {
                "run": "merge",
                "pipeline": cfg.name,
                "final": True,
                "sources": [
                    {"path": path, "step": m["step"], "val_loss": m["val_loss"]}
                    for path, m in chosen
                ],
                "sources_val_loss_mean": sum(m["val_loss"] for _, m in chosen) / len(chosen),
                "created": time.time(),
            }
            checkpoint.write_manifest(Path(out), checkpoint.describe_files(Path(out)), manifest)
            checkpoint.upload(Path(out), fs, merge_path(run_root))
    finally:
        for item in opened:
            item.cleanup()
    return manifest


def main(kind: str, argv: list[str] | None = None) -> int:
    """`python jobs/<kind>.py --config C [--phase P]`: the runs of one stage, in plan order."""
    import argparse
    import sys

    from pydantic import ValidationError

    from llada_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog=f"jobs/{kind}.py", description=main.__doc__)
    parser.add_argument("--config", required=True, help="pipeline YAML")
    if kind == "cpt":
        parser.add_argument(
            "--phase", help="one CPT phase, or a range FIRST:LAST, by name (default: all)"
        )
    parser.add_argument("--parent-run-id", help="MLflow run to nest this stage's runs under")
    args = parser.parse_args(argv)
    try:  # a bad config fails here, before anything reaches the cluster
        cfg = load_config(args.config)
    except (ConfigError, ValidationError) as err:
        print(f"invalid config {args.config}:\n{err}", file=sys.stderr)
        return 2
    selected = [u for u in units(cfg) if u.stage.stage == kind]
    if kind == "cpt" and args.phase:
        try:
            selected = phase_range(cfg, args.phase)
        except ValueError as err:
            print(f"{args.config}: {err}", file=sys.stderr)
            return 2
    if not selected:
        print(f"{args.config}: the pipeline has no {kind} stage", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / the job's cluster, else a local one
    try:  # the CPT phases in one worker group; any other stage is one run
        outcomes = run_units(cfg, selected, args.parent_run_id)
    except (RuntimeError, TrainingFailedError) as err:
        print(f"{kind}: {err}", file=sys.stderr)
        return 1
    for unit, outcome in zip(selected, outcomes, strict=True):
        state = "trained" if outcome.trained else "already done"
        m = outcome.manifest
        loss = (
            f"val_loss {m['val_loss']:.4f}"
            if "val_loss" in m
            else (f"sources' val_loss {m['sources_val_loss_mean']:.4f}")
        )
        print(f"{unit.name:<20} {state:<12} {loss}  {outcome.seconds:7.1f}s  {outcome.output}")
    return 0
