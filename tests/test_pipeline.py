"""The scheduler end to end on the real stack: every stage trained and committed with lineage while
the S3 server goes down mid-upload, a killed driver resumed to the identical model, no-op
resubmission, and refusal of a changed committed stage."""

from __future__ import annotations

import contextlib
import json
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
from llada_ray.train.outputs import finished, output_of, pipeline_root, run_path
from llada_ray.train.plan import find_unit, units
from llada_ray.train.run import run_unit
from tests import stack
from tests.test_train import _assert_same_weights, _final_weights, small_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def pipeline_config(root: str, tracking: str, **overrides: object) -> PipelineConfig:
    """Every stage kind and CPT phase kind, a short evaluation."""
    base = small_config("x", "", "").model_dump(mode="json")
    phases = base["stages"][1]["phases"]  # b1 (warm-up), stable, b16 (decay)
    base["stages"][1]["phases"] = [p for p in phases if p["name"] != "b4"]
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


def _checkpoint_put(data: bytes) -> bool:
    line = data.split(b"\r\n", 1)[0]
    return line.startswith(b"PUT ") and b"/checkpoint_" in line


@pytest.fixture(scope="module")
def flaky_s3(s3) -> Iterator[stack.FlakyProxy]:
    """The S3 server behind a proxy that goes down for 10 s at the first checkpoint upload."""
    port = int(s3.endpoint_url.rsplit(":", 1)[1])
    proxy = stack.FlakyProxy(port, _checkpoint_put, seconds=10)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def reference(ray_cluster, flaky_s3, s3, mlflow_tracking) -> PipelineConfig:
    """The whole pipeline once, storage on the (flaky) S3 server, tracking on the MLflow server."""
    endpoint = f"http://127.0.0.1:{flaky_s3.port}"
    storage = {"root": f"s3://{s3.bucket}/pipeline", "endpoint_url": endpoint}
    cfg = pipeline_config("", mlflow_tracking.uri, storage=storage)
    lines: list[str] = []
    outcome = run_pipeline(cfg, say=lines.append)
    assert outcome.ran == [s.name for s in stage_graph(cfg)], lines
    return cfg


def test_an_s3_outage_mid_upload_is_ridden_out(reference, flaky_s3):
    """The first checkpoint upload met a 10 s outage (connections reset, then refused): storage
    retried with backoff, no run restarted, and every checkpoint left in storage verifies."""
    assert len(flaky_s3.outages) == 1
    start, end = flaky_s3.outages[0]
    assert end - start >= 10
    fs, run_root = pipeline_root(reference)
    committed = manifests.read_all(fs, run_root)
    for unit in units(reference):
        if unit.objective == "merge":
            continue
        assert committed[unit.name]["summary"]["resumed_from"] is None, unit.name
        for path in checkpoint.list_checkpoints(fs, run_path(run_root, unit)):
            fetched = checkpoint.fetch(fs, path, select=lambda _: True)  # every file, checked
            assert fetched is not None, f"{path} is torn"
            fetched.cleanup()


def test_every_stage_trained_and_its_validation_loss_fell(reference, s3, mlflow_tracking):
    cfg = reference
    client = MlflowClient(mlflow_tracking.uri)
    experiment = client.get_experiment_by_name("pipeline-test").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    for unit in units(cfg):
        run = runs[unit.name]
        assert run.info.status == "FINISHED"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "checkpoint_manifest.json"} <= artifacts, unit.name
        if unit.objective == "merge":
            continue
        val = client.get_metric_history(run.info.run_id, "val_loss")
        first, last = min(val, key=lambda m: m.step), max(val, key=lambda m: m.step)
        assert first.step == 0 and last.value < first.value, (unit.name, first, last)
        assert run.data.params["run.objective"] == unit.objective
        assert {"loss", "lr", "tokens_per_s", "block_size"} <= run.data.metrics.keys()
    assert "cap_entropy" in runs["cap"].data.metrics
    assert {"reward_margin", "reward_accuracy"} <= runs["dpo"].data.metrics.keys()
    assert "embed_noise_std" in runs["cpt-b1"].data.metrics
    assert "masked_ratio" in runs["cpt-stable"].data.metrics

    # Checkpoints are on the S3 server; the last CPT phase kept its top-2 + the latest, and the
    # merge averaged the two with the lowest validation loss.
    fs, run_root = pipeline_root(cfg)
    kept = checkpoint.read_manifests(fs, run_path(run_root, find_unit(cfg, "cpt-b16")))
    assert 2 <= len(kept) <= 3
    # Retention across a worker group's runs never takes a run's final checkpoint.
    assert all(finished(fs, run_root, u) for u in units(cfg) if u.training), "a final is gone"
    assert any(k.endswith("/model.safetensors") for k in s3.keys("pipeline/"))
    merged = output_of(fs, run_root, find_unit(cfg, "merge"))
    assert merged is not None
    merged.cleanup()
    best = sorted(m["val_loss"] for _, m in kept)[:2]
    assert sorted(s["val_loss"] for s in merged.manifest["sources"]) == best


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
    assert committed["cpt-b1"]["summary"]["val_loss"] > 0
    assert all(r["state"] == "committed" for r in stage_table(cfg))

    export = committed["export"]["output"]
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(export))}
    assert {"model.safetensors", "config.json", "tokenizer.json", "lineage.json"} <= names
    assert "dcp" not in names and "manifest.json" not in names  # the model, no trainer state
    with fs.open_input_stream(f"{export}/lineage.json") as f:
        lineage = json.loads(f.read())
    # What `llada-ray serve` decodes it with: the block DPO (the last stage) trained at.
    assert lineage["block_size"] == next(s.block_size for s in cfg.stages if s.stage == "dpo")

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
    evaluated = ("merge", "sft", "cap", "dpo", "ar_sft")
    assert {f"task_accuracy_{s}" for s in evaluated} <= set(parent.data.metrics)
    assert {f"task_tpf_{s}" for s in evaluated} <= set(parent.data.metrics)
    version = client.get_model_version_by_alias("pipe", "candidate")
    assert version.source == f"s3://{export}"
    assert version.run_id == parent.info.run_id
    assert version.tags["upstream.sft"] == f"s3://{committed['sft']['output']}"
    assert version.tags["config_hash"] == committed["export"]["config_hash"]


def test_the_ar_baseline_starts_from_the_ar_parent_and_resumes(reference):
    """ar_sft branches off the AR parent, on the SFT rows; its run resumes from its last
    checkpoint that verifies (the newest one's upload died) to the same weights; the pipeline's
    export is the diffusion model, not the baseline."""
    cfg = reference
    fs, run_root = pipeline_root(cfg)
    committed = manifests.read_all(fs, run_root)
    assert committed["ar_sft"]["input"] == committed["ar_pretrain"]["output"]
    unit = find_unit(cfg, "ar_sft")
    assert (unit.starts_from, unit.data) == ("ar_pretrain", find_unit(cfg, "sft").data)
    assert committed["export"]["input"] == committed["dpo"]["output"]
    before = _final_weights(cfg, "ar_sft")
    newest = checkpoint.list_checkpoints(fs, run_path(run_root, unit))[0]
    fs.delete_file(f"{newest}/{checkpoint.MANIFEST}")
    previous = checkpoint.latest(fs, run_path(run_root, unit))
    assert previous is not None
    again = run_unit(cfg, unit)
    assert again.trained and again.manifest["resumed_from"] == previous[1]["step"]
    _assert_same_weights(before, _final_weights(cfg, "ar_sft"))


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


def test_no_credential_in_mlflow_manifests_or_logs(reference, ray_cluster, s3, mlflow_tracking):
    """The S3 keys and the Serve API key of the test environment appear nowhere a run leaves
    text: MLflow params, tags and config artifacts, storage manifests, the cluster's logs."""
    secrets = [stack.S3_ENV["AWS_ACCESS_KEY_ID"], stack.S3_ENV["AWS_SECRET_ACCESS_KEY"],
               stack.SERVE_ENV["LLADA_RAY_TEST_API_KEY"]]  # fmt: skip
    texts: dict[str, bytes] = {}
    client = MlflowClient(mlflow_tracking.uri)
    experiment = client.get_experiment_by_name("pipeline-test").experiment_id
    for run in client.search_runs([experiment]):
        texts[f"mlflow {run.info.run_name}"] = json.dumps([run.data.params, run.data.tags]).encode()
        if any(a.path == "config.yaml" for a in client.list_artifacts(run.info.run_id)):
            local = client.download_artifacts(run.info.run_id, "config.yaml")
            texts[f"mlflow {run.info.run_name} config.yaml"] = Path(local).read_bytes()
    bucket = s3.client()
    for key in s3.keys("pipeline/"):
        if key.endswith((".json", ".yaml")):
            texts[key] = bucket.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    for path in ray_cluster.temp_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                texts[str(path)] = path.read_bytes()
    assert any("manifest.json" in k for k in texts) and any("raylet" in k for k in texts)
    leaks = [(where, s[:4]) for where, text in texts.items() for s in secrets if s.encode() in text]
    assert not leaks


@contextlib.contextmanager
def _driver(cmd: list[str], head: stack.RayHead, log: Path) -> Iterator[subprocess.Popen]:
    """The pipeline job's driver as its own process group, connected to the test head."""
    log.parent.mkdir(parents=True)
    with stack.process_group(cmd, log, {"RAY_ADDRESS": head.address}) as proc:
        yield proc


def test_forced_stage_killed_mid_run_resumes_to_the_same_model(
    reference, ray_cluster, mlflow_tracking, tmp_path
):
    """Redo sft and all after it (--force-from) with the job's driver, SIGKILL the driver while
    sft trains, submit again: the stages before it are not rerun, sft resumes from its
    checkpoint, and the exported model is identical to the one the uninterrupted run exported."""
    cfg = reference
    (tmp_path / "before").mkdir()
    before_weights = _export_weights(cfg, tmp_path / "before")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    fs, run_root = pipeline_root(cfg)
    first = manifests.read_all(fs, run_root)
    target = run_path(run_root, find_unit(cfg, "sft"))

    log = tmp_path / "first" / "driver.log"
    with _driver([*_args(path), "--force-from", "sft"], ray_cluster, log) as proc:
        deadline = time.monotonic() + 600
        # The forced stages are forgotten first (export last), then sft trains afresh.
        while "export" in manifests.read_all(fs, run_root) or not any(
            m.get("step", 0) >= 5 and not m.get("final")
            for _, m in checkpoint.read_manifests(fs, target)
        ):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        os.killpg(proc.pid, 9)
    forced = manifests.read_all(fs, run_root)
    kept = ("pack", "ar_pretrain", "cpt-b1", "cpt-stable", "cpt-b16", "merge")
    assert set(forced) == set(kept)

    log = tmp_path / "second" / "driver.log"
    with _driver(_args(path), ray_cluster, log) as proc:
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        out = log.read_text()
    for stage in kept:
        assert f"{stage:<16} committed, skipped" in out
    after = manifests.read_all(fs, run_root)
    assert after["merge"] == first["merge"]
    assert after["sft"]["summary"]["resumed_from"] >= 5
    (tmp_path / "after").mkdir()
    _assert_same_weights(before_weights, _export_weights(cfg, tmp_path / "after"))
    client = MlflowClient(mlflow_tracking.uri)
    version = client.get_model_version_by_alias("pipe", "candidate")
    assert int(version.version) == 2 and version.source == f"s3://{after['export']['output']}"


def _args(path: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", str(path)]
