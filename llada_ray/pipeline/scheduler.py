"""The scheduler: runs a pipeline's stage graph in order, skipping what is committed.

Training stages run in two worker groups, one Ray Train run each (`train.run.run_units`): the
runs up to the merge, and those after it. A run starts from the previous stage's output and
resumes its own checkpoints after any crash. This process only orchestrates (it is the job's
driver and holds no worker CPUs). A stage is committed by its manifest (inputs, output, a summary
of its metrics, config hash, code version). A committed stage whose settings changed is refused,
naming it, unless the run is forced from it or earlier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow.fs as pafs

from llada_ray import tracking
from llada_ray.config import PipelineConfig
from llada_ray.data.pack import pack_all
from llada_ray.pipeline import lineage, manifests
from llada_ray.pipeline.graph import Stage, find_stage, stage_graph
from llada_ray.progress import pipeline_line
from llada_ray.train.outputs import merge_path, pipeline_root, run_path
from llada_ray.train.plan import Unit
from llada_ray.train.run import RunOutcome, run_unit, run_units


class ChangedStageError(ValueError):
    """A committed stage's settings differ from the config's."""


@dataclass
class PipelineOutcome:
    ran: list[str]
    skipped: list[str]
    export: str | None


def check_committed(graph: list[Stage], committed: dict[str, dict]) -> None:
    for stage in graph:
        found = committed.get(stage.name)
        if found is not None and found["config_hash"] != stage.config_hash:
            raise ChangedStageError(
                f"stage {stage.name!r} is committed with other settings (hash "
                f"{found['config_hash']}, the config now gives {stage.config_hash}): its output "
                f"came from a different config. Rerun with --force-from {stage.name} to redo it "
                "and everything after it, or restore the config."
            )


def _kept(graph: list[Stage], force_from: str | None) -> list[Stage]:
    """The stages a run keeps: all, or those before the one it is forced from."""
    if force_from is None:
        return graph
    return graph[: graph.index(find_stage(graph, force_from))]


def forget_from(cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str, name: str) -> None:
    """Delete the manifests and outputs of stage `name` and of every stage after it."""
    graph = stage_graph(cfg)
    start = graph.index(find_stage(graph, name))
    for stage in graph[start:]:
        manifests.delete(fs, run_root, stage.name)
        for path in _outputs_of(run_root, stage):
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)
        if stage.kind == "train":
            # The group's Ray Train run lists checkpoints just deleted: its state goes too (a
            # new run of the group starts its own; the kept runs' checkpoints stay).
            group = f"{run_root}/train/{stage.unit.trainer}"
            selector = pafs.FileSelector(group, allow_not_found=True)
            for info in fs.get_file_info(selector):
                if info.type == pafs.FileType.File:
                    fs.delete_file(info.path)


def _outputs_of(run_root: str, stage: Stage) -> list[str]:
    if stage.kind == "pack":
        return [f"{run_root}/tokenizer", f"{run_root}/data"]
    if stage.kind == "merge":
        return [merge_path(run_root)]
    if stage.kind == "export":
        return [lineage.export_path(run_root)]
    assert stage.unit is not None
    return [run_path(run_root, stage.unit)]


def run_pipeline(
    cfg: PipelineConfig, force_from: str | None = None, say: Callable[[str], None] = print
) -> PipelineOutcome:
    fs, run_root = pipeline_root(cfg)
    graph = stage_graph(cfg)
    committed = manifests.read_all(fs, run_root)
    check_committed(_kept(graph, force_from), committed)  # before anything is deleted
    if force_from is not None:
        forget_from(cfg, fs, run_root, force_from)
        committed = manifests.read_all(fs, run_root)
    if all(s.name in committed for s in graph):
        say(f"pipeline {cfg.name!r}: all {len(graph)} stages are committed; nothing to train")
        return PipelineOutcome([], [s.name for s in graph], committed["export"]["output"])

    parent = tracking.start_run(cfg, "pipeline", {"pipeline": cfg.model_dump(mode="json")})
    ran, skipped = [], []
    outputs: dict[str, str | None] = {}
    previous: str | None = None  # the output the next stage starts from
    trained: dict[str, RunOutcome] = {}  # the runs of the last worker group, by name
    model: str | None = None  # the newest model: what export publishes
    try:
        for stage in graph:
            if stage.name in committed:
                say(f"{stage.name:<16} committed, skipped")
                skipped.append(stage.name)
                output = committed[stage.name].get("output")
            else:
                say(f"{stage.name:<16} running")
                t0, began = time.perf_counter(), manifests.now()
                if stage.kind == "train" and stage.name not in trained:
                    # This run and the uncommitted ones after it of its worker group (one Ray
                    # Train run): the runs up to the merge, or those after it.
                    group = _group(graph, stage, committed)
                    trained = {o.unit: o for o in run_units(cfg, group, parent)}
                output, summary = _run_stage(cfg, stage, parent, model, say, trained)
                seconds, ended = time.perf_counter() - t0, manifests.now()
                if stage.name in trained:  # trained inside the group: its own span
                    outcome = trained[stage.name]
                    began, seconds = _iso(outcome.started), outcome.seconds
                    ended = _iso(outcome.started + outcome.seconds)
                manifests.write(
                    fs,
                    run_root,
                    {
                        "stage": stage.name,
                        "kind": stage.kind,
                        "config_hash": stage.config_hash,
                        "code_version": manifests.code_version(),
                        "input": _input(stage, previous, outputs),
                        "output": output,
                        "summary": summary,
                        "started": began,
                        "finished": ended,
                        "seconds": round(seconds, 3),
                        "mlflow_parent_run_id": parent,
                    },
                )
                say(f"{stage.name:<16} committed in {seconds:.1f} s → {output}")
                ran.append(stage.name)
            outputs[stage.name] = output
            if not _baseline(stage):  # the AR baseline branches off the line the export follows
                previous = output or previous
                model = previous if stage.kind in ("train", "merge") else model
    except BaseException:
        tracking.finish_run(cfg, parent, None, failed=True)
        raise
    tracking.finish_run(cfg, parent, None)
    return PipelineOutcome(ran, skipped, previous)  # export is the last stage


def _group(graph: list[Stage], first: Stage, committed: dict[str, dict]) -> list[Unit]:
    """`first` and the uncommitted training stages right after it of its worker group."""
    assert first.unit is not None
    out = []
    for stage in graph[graph.index(first) :]:
        if stage.kind != "train" or stage.name in committed or stage.unit is None:
            break
        if stage.unit.trainer != first.unit.trainer:
            break
        out.append(stage.unit)
    return out


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")


def _input(stage: Stage, previous: str | None, outputs: dict[str, str | None]) -> str | None:
    """What a stage started from: the previous stage's output, or the AR baseline's parent's."""
    if not _baseline(stage):
        return previous
    parent = stage.unit.starts_from  # type: ignore[union-attr]
    return outputs.get(parent) if parent else None


def _baseline(stage: Stage) -> bool:
    return stage.unit is not None and stage.unit.baseline


def _run_stage(
    cfg: PipelineConfig,
    stage: Stage,
    parent: str,
    model: str | None,
    say: Callable[[str], None],
    trained: dict[str, RunOutcome],
) -> tuple[str | None, dict]:
    """(output path, metrics summary) of one stage."""
    fs, run_root = pipeline_root(cfg)
    if stage.kind == "pack":
        packed = pack_all(cfg, fs, run_root)
        summary = {
            name: {k: p.manifest.get(k) for k in ("rows", "tokens", "documents")}
            for name, p in packed.items()
        }
        return f"{run_root}/data", summary
    if stage.kind == "export":
        if model is None:
            raise ValueError("export: the pipeline trained no model")
        export = lineage.export(cfg, fs, run_root, model)
        return export, lineage.finish(cfg, fs, run_root, export, parent, say)
    assert stage.unit is not None
    outcome = trained.get(stage.name) or run_unit(cfg, stage.unit, parent)
    m = outcome.manifest
    summary = {k: m.get(k) for k in ("step", "samples", "tokens", "val_loss", "resumed_from")}
    return outcome.output, summary


def main(argv: list[str] | None = None) -> int:
    """`python jobs/pipeline.py --config C [--force-from STAGE]`: the whole pipeline."""
    import argparse
    import sys

    import ray
    from pydantic import ValidationError
    from ray.train import TrainingFailedError

    from llada_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="pipeline", description=main.__doc__)
    parser.add_argument("--config", required=True, help="pipeline YAML")
    parser.add_argument("--force-from", metavar="STAGE", help="redo this stage and all after it")
    args = parser.parse_args(argv)
    try:  # everything that can be refused is refused here, before anything is submitted
        cfg = load_config(args.config)
        fs, run_root = pipeline_root(cfg)
        kept = _kept(stage_graph(cfg), args.force_from)
        check_committed(kept, manifests.read_all(fs, run_root))
    except (ConfigError, ValidationError, ValueError) as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / the job's cluster, else a local one
    try:
        outcome = run_pipeline(
            cfg, args.force_from, lambda line: print(pipeline_line(line), flush=True)
        )
    except (RuntimeError, TrainingFailedError) as err:
        print(f"pipeline {cfg.name!r} failed: {err}", file=sys.stderr)
        return 1
    if outcome.export:
        print(f"exported model: {lineage.uri_of(fs, outcome.export)}")
    return 0
