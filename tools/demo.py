"""`make demo`: corpus → block-diffusion model → served answers, on this machine, in one command.

Starts a local Ray head (its own temp dir and ports; stopped at the end), submits the pipeline job
through Ray's job API and follows it: one line per stage with its progress (step, loss, tokens/s,
ETA), while the job's whole log (Ray's own output included) goes to a file whose path it prints.
Then it serves the exported model with `llada-ray serve`, asks it held-out task questions and
prints the answers, the accuracy per task kind, the error classes, the tokens per forward, the
task settings and the question counts, and saves them all as JSON beside the pipeline's outputs
(`<storage>/<name>/demo/served.json`). Storage and MLflow are local files (runs/, mlflow.db)
unless the config says otherwise.

    python tools/demo.py [--config configs/tiny.yaml] [--questions 128] [--record] [--editing]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs
import requests
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from llada_ray import local_stack
from llada_ray.config import EditingConfig, PipelineConfig, load_config
from llada_ray.data import tasks
from llada_ray.pipeline import manifests
from llada_ray.pipeline.lineage import uri_of
from llada_ray.progress import parse
from llada_ray.train.outputs import pipeline_root
from llada_ray.train.plan import served_block_size

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def local_config(path: Path, editing: bool = False) -> tuple[Path, PipelineConfig]:
    """The config with relative local paths made absolute: the job runs in a copy of the repo.
    With `editing`, the config's own `editing:` (else its defaults) and evaluation in Quality
    mode, as a pipeline of its own (`<name>-editing`)."""
    cfg = load_config(path).anchored(REPO)  # a bad config stops here, before anything starts
    if editing:
        raw = cfg.model_dump(mode="json")
        raw["name"] = f"{cfg.name}-editing"
        raw["editing"] = (cfg.editing or EditingConfig()).model_dump(mode="json")
        raw["evaluation"]["mode"] = raw["evaluation"]["mode"] or "quality"
        cfg = PipelineConfig.model_validate(raw)
    out = REPO / "runs" / f"demo-{cfg.name}.yaml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out, cfg


class Console:
    """Our tagged lines from the job log, one line per stage; everything to `log`."""

    def __init__(self, log: Path) -> None:
        self.log = log.open("w")
        self.live = sys.stdout.isatty()
        self.stage: str | None = None
        self.shown = 0.0  # when the current stage's progress was last printed (not live)
        self.last: dict | None = None  # Ray may forward a worker's line twice

    def feed(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()
        for line in text.splitlines():
            tagged = parse(line)
            if tagged is None:
                continue
            kind, body = tagged
            if kind == "pipeline":
                self._say(str(body))
            else:
                self._progress(body)  # type: ignore[arg-type]

    def _say(self, text: str) -> None:
        self._end_live()
        print(text, flush=True)

    def _progress(self, p: dict) -> None:
        if p == self.last:
            return
        self.last = p
        if "resumed_from" in p:
            why = "worker lost, " if p["lost_worker"] else ""
            self._say(f"{p['run']:<16} {why}resumed from step {p['resumed_from']}")
            return
        done = p["step"] / p["steps"]
        bar = "█" * round(20 * done) + "░" * (20 - round(20 * done))
        streams = f" (M2T {p['m2t_loss']:.3f}, T2T {p['t2t_loss']:.3f})" if "t2t_loss" in p else ""
        line = (
            f"{p['run']:<16} {bar} {p['step']}/{p['steps']}  loss {p['loss']:.3f}{streams}  "
            f"{p['tokens_per_s'] / 1000:.1f}k tok/s  ETA {p['eta_s']} s"
        )
        if self.live:
            print(f"\r{line}\x1b[K", end="", flush=True)
            self.stage = p["run"]
        elif time.monotonic() - self.shown > 15 or p["step"] == p["steps"]:
            print(line, flush=True)
            self.shown = time.monotonic()

    def _end_live(self) -> None:
        if self.live and self.stage is not None:
            print(flush=True)
        self.stage = None

    def close(self) -> None:
        self._end_live()
        self.log.close()


async def follow(client: JobSubmissionClient, job: str, console: Console) -> None:
    async for chunk in client.tail_job_logs(job):
        console.feed(chunk)


def ask(url: str, ex: tasks.Example, decoding: dict) -> dict:
    """One question; `decoding`: the threshold, or the token-editing mode, to ask with."""
    body = {
        "model": "llada-ray",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": ex.prompt}],
    } | decoding
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    reply = r.json()
    answer = reply["choices"][0]["message"]["content"].strip()
    return {
        "task": ex.task,
        "prompt": ex.prompt,
        "expected": ex.answer,
        "answer": answer,
        "error": tasks.error_class(ex.answer, answer),
        "tokens": reply["usage"]["completion_tokens"],
        "forwards": reply["decoding"]["forwards"],
        "edits": reply["decoding"]["edits"],
        "repeated_3grams": reply["decoding"]["repeated_3grams"],
        "trigrams": reply["decoding"]["trigrams"],
    }


def serve_and_ask(
    head: local_stack.RayHead, export: str, cfg: PipelineConfig, n: int
) -> dict | None:
    """The served model's answers to `n` held-out questions and its figures; None if it
    did not come up."""
    port = local_stack.free_port()
    serve_log = Path(tempfile.mkdtemp(prefix="llada-demo-serve-")) / "serve.log"
    cmd = [str(BIN / "llada-ray"), "serve", export, "--address", head.address,
           "--port", str(port), "--name", "demo"]  # fmt: skip
    with local_stack.process_group(cmd, serve_log, {}) as proc:
        url = f"http://127.0.0.1:{port}"
        while not _healthy(url):
            if proc.poll() is not None:
                print(serve_log.read_text(), file=sys.stderr)
                return None
            time.sleep(0.5)
        print(f"\n== serving {export} at {url}/v1", flush=True)
        examples = tasks.examples(cfg.evaluation.seed + 1, 0, n, "heldout", cfg.data.task)
        ev = cfg.evaluation  # as the pipeline evaluated it
        decoding = {"mode": ev.mode} if ev.mode else {"threshold": ev.threshold}
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda ex: ask(url, ex, decoding), examples))
    print(f"\n{'question':<40}{'answer':<22}{'expected':<22}ok")
    for r in replies[:16]:
        ok = "✓" if r["error"] == "ok" else "✗"
        print(f"{r['prompt'][:39]:<40}{r['answer'][:21]:<22}{r['expected'][:21]:<22}{ok}")
    if n > 16:
        print(f"… and {n - 16} more")
    scores = tasks.score(examples, [r["answer"] for r in replies])
    per_task = {k.split("/")[1]: v for k, v in scores.items() if "/" in k}
    tokens, forwards = sum(r["tokens"] for r in replies), sum(r["forwards"] for r in replies)
    errors = tasks.error_counts(r["error"] for r in replies)
    trigrams = sum(r["trigrams"] for r in replies)
    figures = {
        "export": export,
        "threshold": ev.threshold,
        "mode": ev.mode and ev.modes[ev.mode].model_dump(),
        "block_size": served_block_size(cfg),
        "task_settings": tasks.describe(cfg.data.task),
        "question_counts": tasks.counts(cfg.data, n),
        "questions": n,
        "accuracy": scores["accuracy"],
        "per_task": per_task,
        "errors": errors,
        "tokens_per_forward": tokens / max(forwards, 1),
        "repeated_3gram_share": sum(r["repeated_3grams"] for r in replies) / max(trigrams, 1),
        "edits": sum(r["edits"] for r in replies),
        "answers": replies,
    }
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in per_task.items())
    how = f"mode {ev.mode}" if ev.mode else f"τ {ev.threshold}"
    print(f"\nserved model: exact match {scores['accuracy']:.1%} of {n} held-out questions "
          f"({kinds}); {figures['tokens_per_forward']:.2f} tokens per forward, "
          f"{figures['repeated_3gram_share']:.1%} repeated 3-grams ({how}, "
          f"block {figures['block_size']})")  # fmt: skip
    print(f"errors: {errors}")
    print(f"task settings: {figures['task_settings']}")
    print(f"question counts: {figures['question_counts']}")
    return figures


def save(fs: pafs.FileSystem, run_root: str, figures: dict, record: bool) -> str:
    """The served figures as JSON in the pipeline's storage (and bench/results/demo.json, the
    README's source, with --record); returns where."""
    text = json.dumps(figures, indent=1) + "\n"
    path = f"{run_root}/demo/served.json"
    fs.create_dir(f"{run_root}/demo", recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
    if record:
        (REPO / "bench" / "results" / "demo.json").write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument(
        "--record", action="store_true", help="also write bench/results/demo.json (the README's)"
    )
    parser.add_argument(
        "--editing",
        action="store_true",
        help="train with token editing (LLaDA2.1) and serve in Quality mode: <name>-editing",
    )
    args = parser.parse_args()
    started = time.monotonic()
    config, cfg = local_config(Path(args.config), args.editing)
    os.environ.update(local_stack.RAY_ENV)
    logs = REPO / "runs" / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_log = logs / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"

    print(f"== llada-ray demo: pipeline {cfg.name!r} ({config.relative_to(REPO)})", flush=True)
    with local_stack.ray_head(num_cpus=os.cpu_count() or 2) as head:
        print(f"== Ray head {head.address}, dashboard {head.dashboard_url}", flush=True)
        print(f"== the job's full log (Ray's own output included): {job_log}", flush=True)
        client = JobSubmissionClient(head.dashboard_url)
        for handler in logging.getLogger("ray").handlers:  # the job upload's packaging chatter
            handler.setLevel(logging.ERROR)
        runtime_env = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())
        job = client.submit_job(
            # The head is this machine: the job runs in this environment's python.
            entrypoint=f"{sys.executable} jobs/pipeline.py --config {config}",
            runtime_env={**runtime_env, "working_dir": str(REPO)},
        )
        console = Console(job_log)
        try:
            asyncio.run(follow(client, job, console))
        finally:
            console.close()
        if client.get_job_status(job) != JobStatus.SUCCEEDED:
            print(f"the pipeline job failed: see {job_log}", file=sys.stderr)
            return 1
        fs, run_root = pipeline_root(cfg)
        committed = manifests.read_all(fs, run_root)
        export = uri_of(fs, committed["export"]["output"])
        figures = serve_and_ask(head, export, cfg, args.questions)
        if figures is None:
            return 1
    figures["minutes"] = (time.monotonic() - started) / 60
    saved = save(fs, run_root, figures, args.record)
    registered = committed["export"].get("summary", {}).get("registered")
    print(f"\n== done in {(time.monotonic() - started) / 60:.1f} min. Where to look:")
    print(f"  stages:  .venv/bin/llada-ray status {config}")
    print(f"  models:  {uri_of(fs, run_root)} (export: {export})")
    print(f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {cfg.tracking.uri}")
    print(f"  serve:   .venv/bin/llada-ray serve {export}")
    print(f"  job log: {job_log}")
    print(f"  figures: {uri_of(fs, saved)}")
    print(f"  lineage: {json.dumps(registered)}")
    return 0


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False


if __name__ == "__main__":
    sys.exit(main())
