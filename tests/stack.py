"""The real local stack for tests: a Ray head, a moto S3 server and an MLflow server on loopback.

Each service gets free ports and its own temp dir, and runs as the leader of a new process group
whose PID we record; stopping it signals exactly that group and nothing else, since other Ray
processes may share the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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

from botocore.client import BaseClient

BIN = Path(sys.executable).parent

# Every Ray process and CLI call of the tests shares these (ENVIRONMENT.md).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# The Serve tests' API key: the Ray head is started with it, so replicas can read it.
SERVE_ENV = {"LLADA_RAY_TEST_API_KEY": secrets.token_urlsafe(16)}
# moto accepts any credentials; these exist only for the test's S3 server.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
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


@contextlib.contextmanager
def ray_head(num_cpus: int = 4, extra_env: dict[str, str] | None = None) -> Iterator[RayHead]:
    # Short path: Ray's unix sockets live under temp_dir and must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="lr-ray-", dir="/tmp"))
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
    gcs, dashboard = ports["--port"], ports["--dashboard-port"]
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}",
        f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 200}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    env = {**RAY_ENV, **(extra_env or {})}
    with process_group(cmd, temp_dir / "ray-start.log", env) as proc:
        wait_for_port(gcs, proc, temp_dir / "ray-start.log")
        wait_for_port(dashboard, proc, temp_dir / "ray-start.log")
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
    workdir = Path(tempfile.mkdtemp(prefix="lr-s3-"))
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with process_group(cmd, workdir / "moto.log", S3_ENV) as proc:
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
