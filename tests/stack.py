"""The tests' use of the local stack (llada_ray.local_stack), plus what only tests need: their
own credentials and API key, and a proxy that takes S3 down mid-upload."""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

from llada_ray.local_stack import (
    BIN,
    RAY_ENV,
    MlflowServer,
    RayHead,
    S3Server,
    alive_worker_nodes,
    fake_cluster,
    free_port,
    kill_fake_node,
    mlflow_server,
    process_group,
    ray_head,
    s3_server,
    train_worker_nodes,
)

__all__ = [
    "BIN",
    "RAY_ENV",
    "S3_ENV",
    "SERVE_ENV",
    "FlakyProxy",
    "MlflowServer",
    "RayHead",
    "S3Server",
    "alive_worker_nodes",
    "fake_cluster",
    "free_port",
    "kill_fake_node",
    "mlflow_server",
    "process_group",
    "ray_head",
    "s3_server",
    "train_worker_nodes",
]

# The Serve tests' API key: the Ray head is started with it, so replicas can read it.
SERVE_ENV = {"LLADA_RAY_TEST_API_KEY": secrets.token_urlsafe(16)}
# moto accepts any credentials: these are random so that a test can prove none of them leaks.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
    "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    "AWS_DEFAULT_REGION": "us-east-1",
}


class FlakyProxy:
    """A TCP forwarder in front of a loopback server that can be taken down for a while.

    During an outage the port refuses connections and every open one is reset, as when a
    server restarts. `trip` (on client bytes) starts one outage: e.g. on the first PUT of a
    checkpoint file, the outage hits that upload mid-flight.
    """

    def __init__(self, upstream_port: int, trip: Callable[[bytes], bool], seconds: float) -> None:
        self.port = free_port()
        self.outages: list[tuple[float, float]] = []  # (start, end), monotonic
        self._upstream, self._trip, self._seconds = upstream_port, trip, seconds
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._tripped = self._closed = False
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: an outage or the end
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if from_client and not self._tripped and self._trip(data):
                    self._outage()
                    return
                dst.sendall(data)
        for s in (src, dst):
            self._drop(s, reset=False)

    def _drop(self, s: socket.socket, reset: bool) -> None:
        with self._lock:
            self._open.discard(s)
        with contextlib.suppress(OSError):
            if reset:  # SO_LINGER 0: close sends RST, the client sees "connection reset"
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def _outage(self) -> None:
        self._tripped, start = True, time.monotonic()
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            doomed = list(self._open)
        for s in doomed:
            self._drop(s, reset=True)
        time.sleep(self._seconds)
        if not self._closed:
            self._listen()
        self.outages.append((start, time.monotonic()))

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            doomed = list(self._open)
        for s in doomed:
            self._drop(s, reset=False)
