"""The scheduler end to end on the real stack: every stage committed with lineage, a killed driver
resumed to the identical model, no-op resubmission, and refusal of a changed committed stage."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from llada_ray.config import PipelineConfig
from llada_ray.pipeline import manifests
from llada_ray.pipeline.graph import stage_graph
from llada_ray.pipeline.scheduler import ChangedStageError, main, run_pipeline
from llada_ray.pipeline.status import stage_table
from llada_ray.train import checkpoint
from llada_ray.train.plan import find_unit, units
from llada_ray.train.run import pipeline_root, run_path
from tests import stack
from tests.test_train import _assert_same_weights, small_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def pipeline_config(root: str, tracking: str, **overrides: object) -> PipelineConfig:
    """Every stage kind, two CPT phases, a short evaluation."""
    base = small_config("x", "", "").model_dump(mode="json")
    base["stages"][1]["phases"] = [
        {"name": "b4", "block_size": 4, "tokens": 8_000, "lr": 1e-3},
        {"name": "b16", "block_size": 16, "tokens": 16_000, "lr": 5e-4},
    ]
    base |= {
        "name": "pipe",
        "storage": {"root": root},
        "tracking": {"uri": tracking, "experiment": "pipeline-test"},
        "evaluation": {"task_examples": 8, "batch_size": 8, "max_new_tokens": 16},
    }
    return PipelineConfig.model_validate(base | overrides)


def _export_weights(cfg: PipelineConfig, tmp: Path) -> dict:
    fs, run_root = pipeline_root(cfg)
    export = manifests.read_all(fs, run_root)["export"]["output"]
    local = tmp / "model.safetensors"
    pafs.copy_files(f"{export}/model.safetensors", str(local), source_filesystem=fs)
    return load_file(local)


@pytest.fixture(scope="module")
def reference(ray_cluster, s3, mlflow_tracking) -> PipelineConfig:
    """The whole pipeline once, storage on the S3 server, tracking on the MLflow server."""
    storage = {"root": f"s3://{s3.bucket}/pipeline", "endpoint_url": s3.endpoint_url}
    cfg = pipeline_config("", mlflow_tracking.uri, storage=storage)
    lines: list[str] = []
    outcome = run_pipeline(cfg, say=lines.append)
    assert outcome.ran == [s.name for s in stage_graph(cfg)], lines
    return cfg


def test_every_stage_committed_with_lineage_in_mlflow(reference, mlflow_tracking):
    cfg = reference
    fs, run_root = pipeline_root(cfg)
    committed = manifests.read_all(fs, run_root)
    graph = stage_graph(cfg)
    assert set(committed) == {s.name for s in graph}
    for stage in graph:
        m = committed[stage.name]
        assert m["config_hash"] == stage.config_hash and m["code_version"]["package"]
        assert m["output"], stage.name
    assert committed["sft"]["input"] == committed["merge"]["output"]
    assert committed["cpt-b4"]["summary"]["val_loss"] > 0
    assert all(r["state"] == "committed" for r in stage_table(cfg))

    export = committed["export"]["output"]
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(export))}
    assert {"model.safetensors", "config.json", "tokenizer.json", "lineage.json"} <= names
    assert "optimizer.pt" not in names and "manifest.json" not in names

    client = MlflowClient(mlflow_tracking.uri)
    experiment = client.get_experiment_by_name("pipeline-test").experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    children = {
        r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert children == {u.name for u in units(cfg)}
    assert parent.info.status == "FINISHED"
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {
        "plots/loss_per_stage.png",
        "plots/block_size_schedule.png",
        "plots/task_accuracy.png",
    }
    assert {f"task_accuracy_{s}" for s in ("merge", "sft", "cap", "dpo")} <= set(
        parent.data.metrics
    )
    version = client.get_model_version_by_alias("pipe", "candidate")
    assert version.source == f"s3://{export}"
    assert version.run_id == parent.info.run_id
    assert version.tags["upstream.sft"] == f"s3://{committed['sft']['output']}"
    assert version.tags["config_hash"] == committed["export"]["config_hash"]


def test_a_finished_pipeline_submitted_again_trains_nothing(reference, capsys):
    cfg = reference
    lines: list[str] = []
    outcome = run_pipeline(cfg, say=lines.append)
    assert outcome.ran == [] and "nothing to train" in lines[-1]


def test_a_changed_committed_stage_is_refused_by_name(reference, tmp_path, capsys):
    raw = reference.model_dump(mode="json")
    raw["stages"][4]["lr"] = 2e-3  # cap
    with pytest.raises(ChangedStageError, match="stage 'cap' is committed with other settings"):
        run_pipeline(PipelineConfig.model_validate(raw))
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path)]) == 2  # refused before anything is submitted
    assert "--force-from cap" in capsys.readouterr().err
    assert main(["--config", str(path), "--force-from", "nope"]) == 2


@contextlib.contextmanager
def _driver(cmd: list[str], head: stack.RayHead, log: Path) -> Iterator[subprocess.Popen]:
    """The pipeline job's driver as its own process group, connected to the test head."""
    log.parent.mkdir(parents=True)
    with stack.process_group(cmd, log, {"RAY_ADDRESS": head.address}) as proc:
        yield proc


def test_forced_stage_killed_mid_run_resumes_to_the_same_model(
    reference, ray_cluster, mlflow_tracking, tmp_path
):
    """Redo cpt-b16 and all after it (--force-from) with the job's driver, SIGKILL the driver while
    cpt-b16 trains, submit again: the stages before it are not rerun, cpt-b16 resumes from its
    checkpoint, and the exported model is identical to the one the uninterrupted run exported."""
    cfg = reference
    (tmp_path / "before").mkdir()
    before_weights = _export_weights(cfg, tmp_path / "before")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    fs, run_root = pipeline_root(cfg)
    first = manifests.read_all(fs, run_root)
    target = run_path(run_root, find_unit(cfg, "cpt-b16"))

    log = tmp_path / "first" / "driver.log"
    with _driver([*_args(path), "--force-from", "cpt-b16"], ray_cluster, log) as proc:
        deadline = time.monotonic() + 600
        # The forced stages are forgotten first (export last), then cpt-b16 trains afresh.
        while "export" in manifests.read_all(fs, run_root) or not any(
            m.get("step", 0) >= 5 and not m.get("final")
            for _, m in checkpoint.read_manifests(fs, target)
        ):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        os.killpg(proc.pid, 9)
    forced = manifests.read_all(fs, run_root)
    assert set(forced) == {"pack", "ar_pretrain", "cpt-b4"}

    log = tmp_path / "second" / "driver.log"
    with _driver(_args(path), ray_cluster, log) as proc:
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        out = log.read_text()
    for stage in ("pack", "ar_pretrain", "cpt-b4"):
        assert f"{stage:<16} committed, skipped" in out
    after = manifests.read_all(fs, run_root)
    assert after["cpt-b4"] == first["cpt-b4"]
    assert after["cpt-b16"]["summary"]["resumed_from"] >= 5
    (tmp_path / "after").mkdir()
    _assert_same_weights(before_weights, _export_weights(cfg, tmp_path / "after"))
    client = MlflowClient(mlflow_tracking.uri)
    version = client.get_model_version_by_alias("pipe", "candidate")
    assert int(version.version) == 2 and version.source == f"s3://{after['export']['output']}"


def _args(path: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", str(path)]
