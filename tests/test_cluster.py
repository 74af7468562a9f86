"""The autoscaling cluster of cluster/local-fake.yaml (fake_multinode): a CPT phase submitted with
`ray job submit` makes the autoscaler add worker nodes, survives losing one mid-phase by resuming
from its last checkpoint, and the idle nodes are removed afterwards."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from llada_ray.config import PipelineConfig
from llada_ray.progress import parse
from llada_ray.train import checkpoint
from llada_ray.train.outputs import output_of, pipeline_root, run_path
from llada_ray.train.plan import find_unit
from tests import stack

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_cpt_phase_scales_out_survives_a_lost_node_and_scales_back_in(tmp_path, mlflow_tracking):
    # configs/fake-cluster.yaml: two one-CPU workers on a head with no CPUs, so the phase cannot
    # start until the autoscaler adds nodes.
    raw = yaml.safe_load((REPO / "configs/fake-cluster.yaml").read_text())
    raw["storage"] = {"root": str(tmp_path / "runs")}
    raw["tracking"] = {"uri": mlflow_tracking.uri, "experiment": "fake-cluster"}
    # Three times the phase's steps: finding and killing the node takes seconds, and a phase
    # that ends first never loses a worker (seen: resumed_from None).
    raw["stages"][0]["phases"][0]["tokens"] *= 3
    cfg = PipelineConfig.model_validate(raw)
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(raw))
    unit = find_unit(cfg, "cpt-b4")
    fs, run_root = pipeline_root(cfg)
    runs = run_path(run_root, unit)

    with stack.fake_cluster(REPO / "cluster/local-fake.yaml", idle_timeout_minutes=0.1) as head:
        assert stack.alive_worker_nodes(head) == set()
        client = JobSubmissionClient(head.dashboard_url)
        # No working_dir upload: the code is already on this machine, and the fake nodes share
        # one session directory, where a node's runtime-env agent may delete the unpacked copy
        # the driver runs in.
        env_vars = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())["env_vars"]
        job = client.submit_job(
            entrypoint=f"cd {REPO} && {sys.executable} jobs/cpt.py --config {path} --phase b4",
            runtime_env={"env_vars": env_vars},
        )
        seen: set[str] = set()
        deadline = time.monotonic() + 600
        while not checkpoint.read_manifests(fs, runs):  # the first checkpoint is in storage
            status = client.get_job_status(job)
            assert not status.is_terminal(), client.get_job_logs(job)
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            seen |= stack.alive_worker_nodes(head)
            time.sleep(0.5)
        workers = stack.train_worker_nodes(head)
        assert len(set(workers)) == 2  # one worker per one-CPU node
        lost = workers[-1]
        assert stack.kill_fake_node(head, lost)

        while not (status := client.get_job_status(job)).is_terminal():
            assert time.monotonic() < deadline, "the phase did not finish after 600 s"
            seen |= stack.alive_worker_nodes(head)
            time.sleep(1)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs
        assert "cpt-b4" in logs and "trained" in logs
        final = output_of(fs, run_root, unit)
        assert final is not None and final.manifest["resumed_from"] >= 5  # not from scratch
        # What a person sees of it (make demo shows only tagged lines): one "worker lost" line.
        tagged = [parse(line) for line in logs.splitlines()]
        resumed = {(t[1]["resumed_from"], t[1]["lost_worker"]) for t in tagged
                   if t and t[0] == "progress" and "resumed_from" in t[1]}  # fmt: skip
        assert (final.manifest["resumed_from"], True) in resumed
        assert all(lost for _, lost in resumed)
        assert output_of(fs, run_root, find_unit(cfg, "cpt-b16")) is None  # only the phase asked
        assert len(seen) >= 2

        # Idle nodes go after idle_timeout_minutes (6 s here).
        deadline = time.monotonic() + 180
        while stack.alive_worker_nodes(head):
            assert time.monotonic() < deadline, "idle worker nodes were not removed"
            time.sleep(1)
