"""Scale-out on the fake autoscaling cluster (cluster/local-fake.yaml): CPT tokens/s with 1, 2 and 4
workers, and the time a lost node costs.

Weak scaling: each worker keeps configs/fake-cluster.yaml's micro-batch, so the global batch grows
with the workers and each run trains the same number of steps. Every worker is a one-CPU node
the autoscaler adds on demand; all of them share this machine's cores, so past `cpus` workers the
ideal is flat, not linear: efficiency = tokens/s(n) / (min(n, cpus) · tokens/s(1)) is the honest
figure, and the plain ratio to n·tokens/s(1) is reported beside it. tokens/s is the median over
steps of global tokens per optimizer step / step time (MLflow history; the first step is warm-up).

Recovery: the 2-worker run again, with the node of one worker SIGKILLed right after the first
checkpoint reaches storage. `recovery_s` is the time from the kill to the first training step of
the restarted worker group (its MLflow timestamp); `lost_s` is the job's extra wall time over
the undisturbed one.

    python bench/scale.py [--steps N]     → bench/results/scale.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from llada_ray import local_stack as stack
from llada_ray.config import PipelineConfig
from llada_ray.train import checkpoint
from llada_ray.train.outputs import output_of, pipeline_root, run_path
from llada_ray.train.plan import find_unit

ROOT = Path(__file__).resolve().parent.parent

WORKERS = (1, 2, 4)


def config(work: Path, name: str, workers: int, steps: int) -> tuple[PipelineConfig, Path]:
    """A run of `steps` steps on `workers` workers, and its YAML for the job."""
    raw = yaml.safe_load((ROOT / "configs" / "fake-cluster.yaml").read_text())
    cpt = raw["stages"][0]
    micro, seq_len = cpt["micro_batch_size"], raw["data"]["seq_len"]
    cpt["phases"] = [cpt["phases"][0] | {"tokens": steps * workers * micro * seq_len}]
    cpt["checkpoint_every_steps"] = cpt["eval_every_steps"] = max(5, steps // 4)
    raw["data"]["pretrain"] = [{"type": "task", "examples": 12_000}]
    raw["name"] = name
    raw["storage"] = {"root": str(work / "runs")}
    # One experiment per run: its one MLflow run holds the run's step metrics.
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": name}
    raw["scaling"] |= {"num_workers": workers}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return PipelineConfig.model_validate(raw), path


def metric(cfg: PipelineConfig, name: str) -> list:
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (run,) = client.search_runs([experiment])
    return client.get_metric_history(run.info.run_id, name)


def tokens_per_s(cfg: PipelineConfig) -> float:
    return statistics.median(m.value for m in metric(cfg, "tokens_per_s") if m.step > 1)


def submit(head: stack.RayHead, path: Path) -> str:
    """The phase as a job, as users submit it (the code is already on every fake node)."""
    client = JobSubmissionClient(head.dashboard_url)
    env_vars = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())["env_vars"]
    return client.submit_job(
        entrypoint=f"cd {ROOT} && {sys.executable} jobs/cpt.py --config {path} --phase b4",
        runtime_env={"env_vars": env_vars},
    )


def finish(head: stack.RayHead, job: str, cfg: PipelineConfig) -> tuple[dict, float]:
    """(final manifest, job wall seconds) once the job has succeeded."""
    client = JobSubmissionClient(head.dashboard_url)
    while not (status := client.get_job_status(job)).is_terminal():
        time.sleep(1)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job} {status.value}:\n{client.get_job_logs(job)[-3000:]}")
    info = client.get_job_info(job)
    fs, run_root = pipeline_root(cfg)
    final = output_of(fs, run_root, find_unit(cfg, "cpt-b4"))
    assert final is not None
    final.cleanup()
    return final.manifest, (info.end_time - info.start_time) / 1000


def kill_after_first_checkpoint(head: stack.RayHead, cfg: PipelineConfig) -> tuple[float, int]:
    """SIGKILL the node of one training worker once a checkpoint is in storage: (when, pids)."""
    fs, run_root = pipeline_root(cfg)
    while not checkpoint.read_manifests(fs, run_path(run_root, find_unit(cfg, "cpt-b4"))):
        time.sleep(0.2)
    workers = stack.train_worker_nodes(head)
    killed_at = time.time()
    return killed_at, len(stack.kill_fake_node(head, workers[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    steps = parser.parse_args().steps
    work = Path(tempfile.mkdtemp(prefix="lr-bench-scale-"))
    runs: dict[str, dict] = {}
    try:
        with stack.fake_cluster(ROOT / "cluster/local-fake.yaml") as head:
            for n in WORKERS:
                cfg, path = config(work, f"scale-w{n}", n, steps)
                manifest, seconds = finish(head, submit(head, path), cfg)
                runs[f"w{n}"] = {
                    "workers": n,
                    "steps": manifest["step"],
                    "tokens": manifest["tokens"],
                    "tokens_per_s": tokens_per_s(cfg),
                    "job_seconds": seconds,
                }
            cfg, path = config(work, "scale-kill", 2, steps)
            job = submit(head, path)
            killed_at, pids = kill_after_first_checkpoint(head, cfg)
            manifest, seconds = finish(head, job, cfg)
            after = [m.timestamp / 1000 for m in metric(cfg, "loss")]
            recovery = {
                "workers": 2,
                "killed_processes": pids,
                "resumed_from_step": manifest["resumed_from"],
                "recovery_s": min(t for t in after if t > killed_at) - killed_at,
                "lost_s": seconds - runs["w2"]["job_seconds"],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpus, base = os.cpu_count() or 1, runs["w1"]["tokens_per_s"]
    for r in runs.values():
        r["speedup"] = r["tokens_per_s"] / base
        r["efficiency_vs_cores"] = r["speedup"] / min(r["workers"], cpus)
        r["efficiency_vs_workers"] = r["speedup"] / r["workers"]
    report = {
        "setup": {
            "cluster": "cluster/local-fake.yaml: CPU-less head, one-CPU worker nodes on demand",
            "model": "configs/fake-cluster.yaml: qwen3, hidden 64, 2 layers, seq_len 64",
            "phase": "cpt-b4 (block 4), micro-batch 8 per worker, ddp over gloo",
            "steps_per_run": steps,
            "cpus": cpus,
        },
        "scaling": runs,
        "recovery": recovery,
        "note": (
            f"{cpus} cores: every fake node shares them, so workers beyond {cpus} add "
            "contention, not compute; efficiency_vs_cores is the figure a real cluster "
            "(one node per worker) would be judged by."
        ),
    }
    out = ROOT / "bench" / "results" / "scale.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'workers':>8}{'tokens/s':>11}{'speedup':>9}{'eff/cores':>11}{'eff/workers':>13}")
    for r in runs.values():
        print(
            f"{r['workers']:>8}{r['tokens_per_s']:>11,.0f}{r['speedup']:>9.2f}"
            f"{r['efficiency_vs_cores']:>11.0%}{r['efficiency_vs_workers']:>13.0%}"
        )
    print(
        f"\nnode killed after step {recovery['resumed_from_step']}: training again after "
        f"{recovery['recovery_s']:.1f} s, run {recovery['lost_s']:+.1f} s vs undisturbed"
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
