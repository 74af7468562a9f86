"""Shared fixtures. The real local stack (Ray, S3, MLflow on loopback) lives in tests/stack.py."""

from __future__ import annotations

import os
import signal
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from llada_ray.model import train_tokenizer
from tests import stack


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token BPE trained on a slice of the standard library: local, deterministic."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text() for p in sorted(stdlib.glob("*.py"))[:30]]
    return train_tokenizer(texts, vocab_size=512)


def pytest_configure(config: pytest.Config) -> None:
    # Every Ray process, CLI call and S3 client the tests start inherits these.
    os.environ.update(stack.RAY_ENV | stack.S3_ENV | stack.SERVE_ENV)
    # A terminated run (CI time-out, Ctrl-C from a wrapper) still tears its services down.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[stack.RayHead]:
    """A Ray head on loopback; the test process is connected to it as a driver."""
    import ray

    with stack.ray_head() as head:
        ray.init(address=head.address, log_to_driver=False)
        try:
            yield head
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def s3() -> Iterator[stack.S3Server]:
    with stack.s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_tracking() -> Iterator[stack.MlflowServer]:
    with stack.mlflow_server() as server:
        yield server
