"""A real local stack: a Ray head (or an autoscaling fake cluster), a moto S3 server and an
MLflow server on loopback, for the demo, the benchmarks and the tests.

Each service gets free ports and its own temp dir, and runs as the leader of a new process group
whose PID we record; stopping it signals exactly that group and nothing else, since other Ray
processes may share the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from botocore.client import BaseClient

BIN = Path(sys.executable).parent

# Every Ray process and CLI call of a local stack shares these (ENVIRONMENT.md).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open after {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def process_group(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run cmd as the leader of a new process group; on exit SIGTERM the group, then SIGKILL.

    The group's working files live in log's directory, removed once the group is gone.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        _stop_group(proc)
        shutil.rmtree(log.parent, ignore_errors=True)


def _stop_group(leader: subprocess.Popen, grace: float = 15) -> None:
    pgid = leader.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        leader.poll()  # reap the leader: a zombie still counts as a group member
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    leader.wait()


@dataclass(frozen=True)
class RayHead:
    address: str
    dashboard_url: str
    temp_dir: Path
    pid: int


def _ray_start_args(temp_dir: Path) -> tuple[list[str], dict[str, int]]:
    """`ray start` flags giving every port of a head its own free number; (flags, ports)."""
    # Ray refuses a port that falls in its worker range or is used twice: draw until distinct.
    worker_lo = free_port()
    taken = set(range(worker_lo, worker_lo + 201))
    flags = [
        "--port",
        "--dashboard-port",
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    ports: dict[str, int] = {}
    for flag in flags:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        ports[flag] = port
    args = [
        "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 200}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    return args, ports


@contextlib.contextmanager
def ray_head(num_cpus: int = 4, extra_env: dict[str, str] | None = None) -> Iterator[RayHead]:
    # Short path: Ray's unix sockets live under temp_dir and must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="lr-ray-", dir="/tmp"))
    args, ports = _ray_start_args(temp_dir)
    cmd = [str(BIN / "ray"), "start", *args, f"--num-cpus={num_cpus}"]
    env = {**RAY_ENV, **(extra_env or {})}
    yield from _run_head(cmd, temp_dir, ports, env)


@contextlib.contextmanager
def fake_cluster(config: Path, idle_timeout_minutes: float | None = None) -> Iterator[RayHead]:
    """A head whose autoscaler adds and removes worker nodes on this machine (fake_multinode).

    The launcher YAML is copied with the head's GCS address filled in; the worker raylets the
    autoscaler starts are children of the head's monitor, so they stop with its process group.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="lr-fake-", dir="/tmp"))
    args, ports = _ray_start_args(temp_dir)
    launcher = yaml.safe_load(config.read_text())
    launcher["provider"]["gcs_address"] = f"127.0.0.1:{ports['--port']}"
    if idle_timeout_minutes is not None:
        launcher["idle_timeout_minutes"] = idle_timeout_minutes
    head = launcher["available_node_types"][launcher["head_node_type"]]["resources"]
    autoscaling = temp_dir / "autoscaling.yaml"
    autoscaling.write_text(yaml.safe_dump(launcher))
    cmd = [
        str(BIN / "ray"), "start", *args, f"--autoscaling-config={autoscaling}",
        f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
    ]  # fmt: skip
    # The fake nodes' raylets inherit the head's environment: RAY_TMPDIR keeps them in temp_dir.
    env = {**RAY_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_TMPDIR": str(temp_dir)}  # fmt: skip
    yield from _run_head(cmd, temp_dir, ports, env)


def _run_head(
    cmd: list[str], temp_dir: Path, ports: dict[str, int], env: dict[str, str]
) -> Iterator[RayHead]:
    gcs, dashboard = ports["--port"], ports["--dashboard-port"]
    with process_group(cmd, temp_dir / "ray-start.log", env) as proc:
        # The dashboard agent takes job submissions: up last, and up means the head is ready.
        for port in (gcs, dashboard, ports["--dashboard-agent-listen-port"]):
            wait_for_port(port, proc, temp_dir / "ray-start.log")
        yield RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dir, proc.pid)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def client(self) -> BaseClient:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(bucket: str = "llada-test") -> Iterator[S3Server]:
    """moto accepts any credentials; boto3 and pyarrow need some in the environment."""
    workdir = Path(tempfile.mkdtemp(prefix="lr-s3-"))
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with process_group(cmd, workdir / "moto.log", {}) as proc:
        wait_for_port(port, proc, workdir / "moto.log")
        server = S3Server(f"http://127.0.0.1:{port}", bucket)
        server.client().create_bucket(Bucket=bucket)
        yield server


@dataclass(frozen=True)
class MlflowServer:
    uri: str


@contextlib.contextmanager
def mlflow_server() -> Iterator[MlflowServer]:
    workdir = Path(tempfile.mkdtemp(prefix="lr-mlflow-"))
    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with process_group(cmd, workdir / "mlflow.log", env) as proc:
        wait_for_port(port, proc, workdir / "mlflow.log", timeout=120)
        yield MlflowServer(f"http://127.0.0.1:{port}")


def alive_worker_nodes(head: RayHead) -> set[str]:
    """Node ids of the cluster's live nodes other than the head."""
    from ray.util.state import list_nodes

    # Filtered in Python: a filtered listing counts as truncated once some node is dead.
    nodes = list_nodes(address=head.dashboard_url)
    return {n.node_id for n in nodes if n.state == "ALIVE" and not n.is_head_node}


def train_worker_nodes(head: RayHead) -> list[str]:
    """The node id of each live Ray Train worker, in rank order as listed."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=head.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [a.node_id for a in actors]


def kill_fake_node(head: RayHead, node_id: str) -> list[int]:
    """SIGKILL every process of one fake_multinode worker node, as if the machine died.

    Those are the processes of the head's group that name the node (its raylet and agents take
    the id as an argument) and their descendants (the node's workers, in sessions of their own).
    """
    parents: dict[int, int] = {}
    named: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if os.getpgid(pid) == head.pid and node_id.encode() in (entry / "cmdline").read_bytes():
                named.add(pid)
    doomed = set(named)
    while grown := {pid for pid, ppid in parents.items() if ppid in doomed} - doomed:
        doomed |= grown
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(doomed)
