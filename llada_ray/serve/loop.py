"""A replica's decode loop: continuous batching at block granularity. No Ray here.

One thread owns the running batch (a decoder `Run`). Callers `submit` jobs from any thread or
event loop and read their updates from their own queue. Between steps the thread admits waiting
jobs first come, first served, as long as the batch has rows free, so a new request waits for
at most one step (a block) of the running ones, never for them to finish; a finished request
leaves at once, and a cancelled one (its client went away) at the next step. The decoders are
batch-invariant (each row attends to its own cache row, samples from its own generator), so a
request's tokens do not depend on what else is running.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from llada_ray.serve.engine import Job, Progress, TextEngine, Update


class DecodeError(RuntimeError):
    """The decoder failed during a step: every request in that step ends with it."""


@dataclass(eq=False)
class Ticket:
    """One job's link between the decode thread and the event loop waiting for it."""

    job: Job
    progress: Progress
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: Update | Exception | None) -> None:
        """From the decode thread: the next update, an error, or None at the end."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def updates(self) -> AsyncIterator[Update]:
        """Updates until the job ends. A caller that stops reading (a disconnect cancels it)
        cancels the job: its row is freed at the next step."""
        try:
            while (item := await self.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.progress.request.cancelled = True  # no effect once it has finished


def _deliver(items: list[tuple[Ticket, Update | None]]) -> None:
    """On a ticket's event loop: a step's updates, handed over together."""
    for ticket, item in items:
        ticket.queue.put_nowait(item)


def bucket_bounds(limit: int) -> list[int]:
    """1, 2, 4, … up to `limit`: histogram buckets for batch sizes."""
    bounds = [1]
    while bounds[-1] < limit:
        bounds.append(bounds[-1] * 2)
    return bounds


@dataclass
class LoopStats:
    """What the loop did, for `/stats` and the benchmark; `observe_*` are also the hooks a
    metrics exporter overrides (serve/app.py sends them to Ray's metrics)."""

    max_batch: int
    steps: int = 0
    batch_steps: dict[int, int] = field(default_factory=dict)  # batch size → steps at it
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    queue_wait_s: float = 0.0  # summed over admitted requests
    first_block_s: float = 0.0  # summed over requests that got a first update

    def observe_step(self, batch_size: int) -> None:
        self.steps += 1
        self.batch_steps[batch_size] = self.batch_steps.get(batch_size, 0) + 1

    def observe_admitted(self, queue_wait_s: float) -> None:
        self.admitted += 1
        self.queue_wait_s += queue_wait_s

    def observe_first_block(self, seconds: float) -> None:
        self.first_block_s += seconds

    def observe_finished(self, tokens: int, seconds: float) -> None:
        self.finished += 1
        self.tokens += tokens

    def summary(self) -> dict:
        steps = max(self.steps, 1)
        mean = sum(size * n for size, n in self.batch_steps.items()) / steps
        bounds = bucket_bounds(self.max_batch)
        histogram = dict.fromkeys(bounds, 0)
        for size, n in self.batch_steps.items():
            histogram[bounds[bisect.bisect_left(bounds, size)]] += n
        return {
            "steps": self.steps,
            "mean_batch_size": round(mean, 3),
            "batch_size_histogram": {f"<={b}": n for b, n in histogram.items()},
            "admitted": self.admitted,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "tokens": self.tokens,
            "mean_queue_wait_s": round(self.queue_wait_s / max(self.admitted, 1), 5),
            "mean_time_to_first_block_s": round(self.first_block_s / max(self.admitted, 1), 5),
        }


class EngineLoop:
    """The decode thread and its queue of waiting tickets (see the module docstring)."""

    def __init__(self, engine: TextEngine, stats: LoopStats | None = None) -> None:
        self.engine = engine
        self.stats = stats or LoopStats(engine.decoder.options.max_batch)
        self.run = engine.decoder.open()
        self.waiting: deque[Ticket] = deque()
        self.running: list[Ticket] = []
        self.wake = threading.Condition()
        # OpenMP's thread count is per thread, and Ray sets OMP_NUM_THREADS to an actor's
        # num_cpus: a new thread would run torch on that many cores, not on torch_threads.
        self.torch_threads = torch.get_num_threads()
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Ticket:
        """Queue a job (from the caller's event loop); read its updates from the ticket."""
        ticket = Ticket(job, self.engine.start(job), asyncio.get_running_loop())
        with self.wake:
            self.waiting.append(ticket)
            self.wake.notify()
        return ticket

    @property
    def load(self) -> dict:
        with self.wake:
            return {"running": len(self.running), "waiting": len(self.waiting)}

    def _admit(self) -> None:
        with self.wake:
            while not self.waiting and not self.run:
                self.wake.wait()
            while self.waiting and self.run.room:
                ticket = self.waiting.popleft()
                if ticket.progress.request.cancelled:  # gone before it started
                    self.stats.cancelled += 1
                    continue
                self.run.add(ticket.progress.request)
                self.running.append(ticket)
                self.stats.observe_admitted(time.perf_counter() - ticket.submitted)

    def _loop(self) -> None:
        torch.set_num_threads(self.torch_threads)
        while True:
            self._admit()
            size = len(self.running)
            try:
                self.run.step()
            except Exception as err:  # the step's requests fail; the loop and the queue go on
                for ticket in self.running:
                    ticket.put(DecodeError(f"decoding failed: {err}"))
                self.stats.failed += len(self.running)
                self.running, self.run = [], self.engine.decoder.open()
                continue
            self.stats.observe_step(size)
            now = time.perf_counter()
            still = []
            # One wake-up per event loop per step, not one per request: each is a trip
            # through the GIL for the thread serving HTTP.
            out: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Update | None]]] = {}
            for ticket in self.running:
                request = ticket.progress.request
                if request.out.finish_reason == "cancelled":
                    self.stats.cancelled += 1
                    continue
                first = ticket.progress.updates == 0
                update = self.engine.update(ticket.job, ticket.progress)
                if first:
                    self.stats.observe_first_block(now - ticket.submitted)
                items = out.setdefault(ticket.loop, [])
                items.append((ticket, update))
                if request.out.done:
                    self.stats.observe_finished(len(request.out.tokens), request.out.seconds)
                    items.append((ticket, None))
                else:
                    still.append(ticket)
            for loop, items in out.items():
                loop.call_soon_threadsafe(_deliver, items)
            self.running = still
