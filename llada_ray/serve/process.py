"""The decode loop in a process of its own, as vLLM's engine core: the replica's process serves
HTTP (Serve's request path, FastAPI, the SSE stream), this one decodes, and neither waits for
the other's GIL. No Ray here: the child is a plain process the replica owns.

Jobs go in over a pipe by key; each decode step comes back as one message: the step's updates,
the stats events it observed (replayed into the replica's metrics) and the loop's state. The
child exits when the pipe closes (its replica is gone, however it went). Both ends are ours, so
the pipe's pickles are trusted data.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import traceback
from multiprocessing.connection import Connection

from llada_ray.config import ServeConfig
from llada_ray.serve.engine import Job, TextEngine
from llada_ray.serve.loop import DecodeError, EngineLoop, Item, LoopStats, Ticket, Tickets


class EngineProcess:
    """The replica's side: starts the decode process (blocks until its model is loaded and
    warm), submits jobs to it and hands their updates to tickets."""

    def __init__(self, cfg: ServeConfig, stats: LoopStats) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process running threads
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=decode_forever, args=(cfg, child), name="llada-decode", daemon=True
        )
        self.process.start()
        child.close()
        kind, detail = self.conn.recv()
        if kind != "ready":
            raise RuntimeError(f"the decode process did not start:\n{detail}")
        self.stats = stats
        self.state: dict = {"running": 0, "waiting": 0, "prefix_cache": None}
        self.tickets = Tickets()
        self.sending = threading.Lock()
        self.reader = threading.Thread(target=self._read, name="decode-reader", daemon=True)
        self.reader.start()

    def submit(self, job: Job) -> Ticket:
        key, ticket = self.tickets.new(self.cancel)
        self._send(("submit", key, job))
        return ticket

    def cancel(self, key: int) -> None:
        with contextlib.suppress(DecodeError):  # a process that is gone has nothing to cancel
            self._send(("cancel", key))

    def _send(self, message: tuple) -> None:
        with self.sending:
            try:
                self.conn.send(message)
            except (OSError, ValueError) as err:  # the decode process is gone
                raise DecodeError(f"the decode process is gone: {err}") from err

    def _read(self) -> None:
        while True:
            try:
                items, events, state = self.conn.recv()
            except (EOFError, OSError):
                self.tickets.fail(DecodeError("the decode process exited"))
                return
            for kind, args in events:
                getattr(self.stats, f"observe_{kind}")(*args)
            self.state = state
            self.stats.observe_state(state)
            self.tickets.deliver(items)


def decode_forever(cfg: ServeConfig, conn: Connection) -> None:
    """The decode process: load the model, then run jobs until the pipe closes."""
    try:
        engine = TextEngine.load(cfg)
    except Exception:
        conn.send(("failed", traceback.format_exc()))
        return
    sending = threading.Lock()

    def sink(items: list[tuple[int, Item]], events: list, state: dict) -> None:
        with sending:
            conn.send((items, events, state))

    loop = EngineLoop(engine, sink=sink)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the replica is gone: so is everything this process was doing
        if message[0] == "submit":
            loop.enqueue(message[1], message[2])
        else:
            loop.cancel(message[1])
