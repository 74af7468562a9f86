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
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from llada_ray.serve.engine import Job, Progress, TextEngine, Update


class DecodeError(RuntimeError):
    """The decoder failed during a step: every request in that step ends with it."""


Item = Update | Exception | None  # an update, an error, or None: the end of a job's updates
Sink = Callable[[list[tuple[int, Item]], list[tuple[str, tuple]], dict], None]


class Ticket:
    """A submitted job as its caller sees it: its updates arrive on the caller's event loop."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.cancel = cancel

    async def updates(self) -> AsyncIterator[Update]:
        """Updates until the job ends. A caller that stops reading (a disconnect cancels it)
        cancels the job: its row is freed at the next step."""
        ended = False
        try:
            while (item := await self.queue.get()) is not None:
                if isinstance(item, Exception):
                    ended = True
                    raise item
                yield item
            ended = True
        finally:
            if not ended:  # a job that ended has nothing to cancel (no message to send)
                self.cancel()


def deliver(items: list[tuple[Ticket, Item]]) -> None:
    """From any thread: each ticket its items, with one wake-up per event loop (each is a trip
    through the GIL for a thread serving HTTP)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Item]]] = {}
    for ticket, item in items:
        by_loop.setdefault(ticket.loop, []).append((ticket, item))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _put_all(items: list[tuple[Ticket, Item]]) -> None:
    for ticket, item in items:
        ticket.queue.put_nowait(item)


class Tickets:
    """Tickets by key, for a sink that names jobs by key."""

    def __init__(self) -> None:
        self.open: dict[int, Ticket] = {}
        self.keys = itertools.count()

    def new(self, cancel: Callable[[int], None]) -> tuple[int, Ticket]:
        key = next(self.keys)
        self.open[key] = Ticket(partial(cancel, key))
        return key, self.open[key]

    def deliver(self, items: list[tuple[int, Item]]) -> None:
        deliver([(self.open.pop(k) if item is None else self.open[k], item) for k, item in items])

    def fail(self, error: Exception) -> None:
        """Every open ticket ends with `error`."""
        keys = list(self.open)
        self.deliver([(k, error) for k in keys] + [(k, None) for k in keys])


@dataclass(eq=False)
class Entry:
    """A job on the decode side."""

    key: int
    job: Job
    progress: Progress
    submitted: float = field(default_factory=time.perf_counter)


def bucket_bounds(limit: int) -> list[int]:
    """1, 2, 4, … up to `limit`: histogram buckets for batch sizes."""
    bounds = [1]
    while bounds[-1] < limit:
        bounds.append(bounds[-1] * 2)
    return bounds


@dataclass
class LoopStats:
    """What the loop did, for `/stats` and the benchmark. The loop calls `observe_<kind>`
    only (events that can be replayed in another process); a metrics exporter overrides them
    (serve/metrics.py sends them to Ray's metrics)."""

    max_batch: int
    steps: int = 0
    batch_steps: dict[int, int] = field(default_factory=dict)  # batch size → steps at it
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    forwards: int = 0  # summed over finished requests
    repeated_3grams: int = 0  # 3-grams of finished answers seen earlier in the same answer
    trigrams: int = 0
    edits: int = 0  # token editing: decided tokens replaced
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

    def observe_finished(
        self, tokens: int, seconds: float, forwards: int, repeated: int, trigrams: int, edits: int
    ) -> None:
        self.finished += 1
        self.tokens += tokens
        self.forwards += forwards
        self.repeated_3grams += repeated
        self.trigrams += trigrams
        self.edits += edits

    def observe_cancelled(self) -> None:
        self.cancelled += 1

    def observe_failed(self, requests: int) -> None:
        self.failed += requests

    def observe_state(self, state: dict) -> None:
        """The loop's state (running, waiting, prefix cache) as another process reported it."""

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
            "tokens_per_forward": round(self.tokens / max(self.forwards, 1), 3),
            "repeated_3gram_share": round(self.repeated_3grams / max(self.trigrams, 1), 4),
            "edits": self.edits,
            "mean_queue_wait_s": round(self.queue_wait_s / max(self.admitted, 1), 5),
            "mean_time_to_first_block_s": round(self.first_block_s / max(self.admitted, 1), 5),
        }


class EngineLoop:
    """The decode thread and its queue of waiting jobs (see the module docstring).

    In-process callers `submit` and read their Ticket. Another process's jobs come in by key
    (`enqueue`, `cancel`) and their items go out through `sink`, once per step, with the stats
    events of the step and the loop's state (serve/process.py)."""

    def __init__(
        self, engine: TextEngine, stats: LoopStats | None = None, sink: Sink | None = None
    ) -> None:
        self.engine = engine
        self.stats = stats or LoopStats(engine.decoder.options.max_batch)
        self.tickets = Tickets()
        self.sink = sink or (lambda items, events, state: self.tickets.deliver(items))
        self.events: list[tuple[str, tuple]] = []
        self.run = engine.decoder.open()
        self.entries: dict[int, Entry] = {}  # waiting or running
        self.waiting: deque[Entry] = deque()
        self.running: list[Entry] = []
        self.wake = threading.Condition()
        # OpenMP's thread count is per thread, and Ray sets OMP_NUM_THREADS to an actor's
        # num_cpus: a new thread would run torch on that many cores, not on torch_threads.
        self.torch_threads = torch.get_num_threads()
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Ticket:
        """Queue a job (from the caller's event loop); read its updates from the ticket."""
        key, ticket = self.tickets.new(self.cancel)
        self.enqueue(key, job)
        return ticket

    def enqueue(self, key: int, job: Job) -> None:
        entry = Entry(key, job, self.engine.start(job))
        with self.wake:
            self.entries[key] = entry
            self.waiting.append(entry)
            self.wake.notify()

    def cancel(self, key: int) -> None:
        """From any thread: the job leaves at the next step (no effect once it has ended)."""
        if (entry := self.entries.get(key)) is not None:
            entry.progress.request.cancelled = True

    @property
    def state(self) -> dict:
        with self.wake:
            load = {"running": len(self.running), "waiting": len(self.waiting)}
        prefix = self.engine.prefix_stats
        return load | {"prefix_cache": None if prefix is None else prefix.summary()}

    def _observe(self, kind: str, *args: float) -> None:
        getattr(self.stats, f"observe_{kind}")(*args)
        self.events.append((kind, args))

    def _end(self, entry: Entry, items: list[tuple[int, Item]]) -> None:
        items.append((entry.key, None))
        self.entries.pop(entry.key, None)

    def _admit(self) -> list[tuple[int, Item]]:
        ended: list[tuple[int, Item]] = []
        with self.wake:
            while not self.waiting and not self.run:
                self.wake.wait()
            while self.waiting and self.run.room:
                entry = self.waiting.popleft()
                if entry.progress.request.cancelled:  # gone before it started
                    self._observe("cancelled")
                    self._end(entry, ended)
                    continue
                self.run.add(entry.progress.request)
                self.running.append(entry)
                self._observe("admitted", time.perf_counter() - entry.submitted)
        return ended

    def _loop(self) -> None:
        torch.set_num_threads(self.torch_threads)
        while True:
            items = self._admit()
            size = len(self.running)
            try:
                self.run.step()
            except Exception as err:  # the step's requests fail; the loop and the queue go on
                for entry in self.running:
                    items.append((entry.key, DecodeError(f"decoding failed: {err}")))
                    self._end(entry, items)
                self._observe("failed", len(self.running))
                self.running, self.run = [], self.engine.decoder.open()
                self._send(items)
                continue
            self._observe("step", size)
            now = time.perf_counter()
            still = []
            for entry in self.running:
                request = entry.progress.request
                if request.out.finish_reason == "cancelled":
                    self._observe("cancelled")
                    self._end(entry, items)
                    continue
                first = entry.progress.updates == 0
                update = self.engine.update(entry.job, entry.progress)
                items.append((entry.key, update))
                if first:
                    self._observe("first_block", now - entry.submitted)
                if request.out.done:
                    out = request.out
                    self._observe("finished", len(out.tokens), out.seconds, out.forwards,
                                  update.repeated_3grams, update.trigrams, out.edits)  # fmt: skip
                    self._end(entry, items)
                else:
                    still.append(entry)
            self.running = still
            self._send(items)

    def _send(self, items: list[tuple[int, Item]]) -> None:
        events, self.events = self.events, []
        self.sink(items, events, self.state)
