"""What a running pipeline tells a person, as tagged lines in its job log.

The job log also holds everything Ray, its workers and libraries print. Two tags mark ours, so a
front end (`make demo`) can show them alone and keep the rest in a file:
  `[pipeline] <text>`     the scheduler: a stage runs, is committed or skipped, evaluation;
  `[progress] <json>`     a training run's rank 0, every few seconds: step, loss, tokens/s, ETA.
"""

from __future__ import annotations

import json
import time

PIPELINE, PROGRESS = "[pipeline] ", "[progress] "
STREAMS = ("m2t_loss", "t2t_loss")  # a run that trains two streams shows each


def pipeline_line(text: str) -> str:
    return PIPELINE + text


def progress_line(**fields: object) -> str:
    return PROGRESS + json.dumps(fields)


def parse(line: str) -> tuple[str, str | dict] | None:
    """("pipeline", text) or ("progress", fields) for a tagged line (a Ray worker prefixes its
    output with its name, so the tag may come mid-line); None for anything else."""
    if line.startswith(PIPELINE):
        return "pipeline", line[len(PIPELINE) :].rstrip("\n")
    at = line.find(PROGRESS)
    if at >= 0:
        try:
            return "progress", json.loads(line[at + len(PROGRESS) :])
        except json.JSONDecodeError:
            return None
    return None


class RunProgress:
    """A training run's progress lines: at most one per `every_s`, and the last step's."""

    def __init__(self, run: str, steps: int, start_step: int, every_s: float = 2.0) -> None:
        self.run, self.steps, self.start_step, self.every_s = run, steps, start_step, every_s
        self.started = self.last = time.monotonic()

    def resumed(self, step: int, lost_worker: bool) -> None:
        print(progress_line(run=self.run, resumed_from=step, lost_worker=lost_worker), flush=True)

    def update(self, step: int, figures: dict[str, float]) -> None:
        """`figures`: the step's loss and tokens/s, and each stream's loss where a run trains
        two (token editing: m2t_loss, t2t_loss)."""
        now = time.monotonic()
        if now - self.last < self.every_s and step < self.steps:
            return
        self.last = now
        per_step = (now - self.started) / max(step - self.start_step, 1)
        line = progress_line(
            run=self.run,
            step=step,
            steps=self.steps,
            loss=round(figures["loss"], 4),
            **{k: round(figures[k], 4) for k in STREAMS if k in figures},
            tokens_per_s=round(figures["tokens_per_s"]),
            eta_s=round(per_step * (self.steps - step)),
        )
        print(line, flush=True)
