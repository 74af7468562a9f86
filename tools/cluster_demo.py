"""`make cluster-demo`: an autoscaling Ray cluster on this machine, from cluster/local-fake.yaml.

Starts a head (no CPUs) whose fake_multinode autoscaler launches worker "nodes" as local raylets,
submits a CPT phase of configs/fake-cluster.yaml that needs two one-CPU workers with
`ray job submit`'s API, and prints the nodes as the autoscaler adds them and, once the phase is
done and the nodes idle, removes them. Everything it starts stops at the end.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml
from ray.job_submission import JobSubmissionClient

from llada_ray import local_stack as stack

ROOT = Path(__file__).resolve().parent.parent


def _say(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)


def main() -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="llada-cluster-demo-"))
    raw = yaml.safe_load((ROOT / "configs/fake-cluster.yaml").read_text())
    # The job runs in a copy of the working dir: absolute paths keep its output here.
    raw["storage"] = {"root": str(work / "runs")}
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "fake-cluster"}
    config = work / "fake-cluster.yaml"
    config.write_text(yaml.safe_dump(raw))
    launcher = ROOT / "cluster/local-fake.yaml"
    idle = yaml.safe_load(launcher.read_text())["idle_timeout_minutes"]

    with stack.fake_cluster(launcher) as head:
        _say(started, f"head up at {head.address} (no CPUs), dashboard {head.dashboard_url}")
        client = JobSubmissionClient(head.dashboard_url)
        # No working_dir upload: the code is already on this machine, and the fake nodes share
        # one session directory, where a node's runtime-env agent may delete the unpacked copy
        # the driver runs in.
        env_vars = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())["env_vars"]
        job = client.submit_job(
            entrypoint=f"cd {ROOT} && {sys.executable} jobs/cpt.py --config {config} --phase b4",
            runtime_env={"env_vars": env_vars},
        )
        _say(started, f"submitted {job}: CPT phase b4 on 2 workers × 1 CPU")
        nodes: set[str] = set()
        peak = 0

        def watch() -> None:
            nonlocal nodes, peak
            now = stack.alive_worker_nodes(head)
            for node in sorted(now - nodes):
                _say(started, f"+ worker node {node[-5:]} added   ({len(now)} up)")
            for node in sorted(nodes - now):
                _say(started, f"- worker node {node[-5:]} removed ({len(now)} up)")
            nodes, peak = now, max(peak, len(now))

        while not (status := client.get_job_status(job)).is_terminal():
            watch()
            time.sleep(1)
        _say(started, f"job {status.value}")
        tail = 3 if status.value == "SUCCEEDED" else 60
        print("\n".join("    " + line for line in client.get_job_logs(job).splitlines()[-tail:]))
        _say(started, f"waiting for idle nodes to go (idle_timeout_minutes: {idle})")
        deadline = time.monotonic() + idle * 60 + 120
        while nodes and time.monotonic() < deadline:
            watch()
            time.sleep(1)
    _say(started, f"done: peak {peak} worker nodes, {len(nodes)} left at the end; output in {work}")
    return 0 if status.value == "SUCCEEDED" and not nodes else 1


if __name__ == "__main__":
    sys.exit(main())
