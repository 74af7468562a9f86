"""`make demo`: corpus → block-diffusion model → served answers, on this machine, in one command.

Starts a local Ray head (its own temp dir and ports; stopped at the end), submits the pipeline job
with `ray job submit` and follows its log, then serves the exported model with `llada-ray serve`
and asks it verifiable-task questions, printing answers, accuracy and tokens per forward. Storage
and MLflow are local files (runs/, mlflow.db) unless the config says otherwise.

    python tools/demo.py [--config configs/tiny.yaml] [--questions 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llada_ray.config import load_config  # noqa: E402
from llada_ray.data import tasks  # noqa: E402
from llada_ray.pipeline import manifests  # noqa: E402
from llada_ray.pipeline.lineage import uri_of  # noqa: E402
from llada_ray.train.run import pipeline_root  # noqa: E402
from tests import stack  # noqa: E402  (the same local Ray head the tests start)

BIN = Path(sys.executable).parent


def local_config(path: Path) -> Path:
    """The config with relative local paths made absolute: the job runs in a copy of the repo."""
    cfg = load_config(path).anchored(REPO)  # a bad config stops here, before anything starts
    out = REPO / "runs" / f"demo-{path.stem}.yaml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out


def ask(url: str, model: str, ex: tasks.Example) -> dict:
    body = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": ex.prompt}]}
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    reply = r.json()
    return {
        "answer": reply["choices"][0]["message"]["content"].strip(),
        "tpf": reply["decoding"]["tokens_per_forward"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--questions", type=int, default=16)
    args = parser.parse_args()
    started = time.monotonic()
    config = local_config(Path(args.config))
    cfg = load_config(config)
    os.environ.update(stack.RAY_ENV)

    print(f"== llada-ray demo: pipeline {cfg.name!r} ({config})", flush=True)
    with stack.ray_head(num_cpus=os.cpu_count() or 2) as head:
        print(f"== Ray head {head.address}, dashboard {head.dashboard_url}", flush=True)
        submit = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            head.dashboard_url,
            "--working-dir",
            str(REPO),
            "--runtime-env",
            str(REPO / "cluster/runtime_env.yaml"),
            "--",
            sys.executable,  # the head is this machine: the job runs in this environment
            "jobs/pipeline.py",
            "--config",
            str(config),
        ]
        print("== " + " ".join(submit[1:]), flush=True)
        if subprocess.run(submit, cwd=REPO).returncode != 0:
            print("the pipeline job failed; its log is above", file=sys.stderr)
            return 1
        fs, run_root = pipeline_root(cfg)
        committed = manifests.read_all(fs, run_root)
        export = uri_of(fs, committed["export"]["output"])
        accuracy = committed["export"]["summary"].get("task_accuracy", {})

        port = stack.free_port()
        serve_log = Path(tempfile.mkdtemp(prefix="llada-demo-serve-")) / "serve.log"
        cmd = [
            str(BIN / "llada-ray"),
            "serve",
            export,
            "--address",
            head.address,
            "--port",
            str(port),
            "--name",
            "demo",
        ]
        with stack.process_group(cmd, serve_log, {}) as proc:
            url = f"http://127.0.0.1:{port}"
            while not _healthy(url):
                if proc.poll() is not None:
                    print(serve_log.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.5)
            print(f"== serving {export} at {url}/v1", flush=True)
            examples = tasks.examples(cfg.evaluation.seed + 1, 0, args.questions)
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda ex: ask(url, "llada-ray", ex), examples))
        print(f"\n{'question':<44}{'answer':<24}{'expected':<24}ok")
        for ex, r in zip(examples, replies, strict=True):
            print(
                f"{ex.prompt[:43]:<44}{r['answer'][:23]:<24}{ex.answer[:23]:<24}"
                f"{'✓' if r['answer'] == ex.answer else '✗'}"
            )
        hits = sum(r["answer"] == ex.answer for ex, r in zip(examples, replies, strict=True))
        similar = tasks.score(examples, [r["answer"] for r in replies])["similarity"]
        tpf = sum(r["tpf"] for r in replies) / len(replies)
        print(
            f"\naccuracy {hits}/{len(examples)} = {hits / len(examples):.0%}, answer similarity "
            f"{similar:.0%}, mean tokens per forward {tpf:.2f}"
        )
        if accuracy:
            print(
                "pipeline evaluation, exact match / answer similarity by stage: "
                + ", ".join(
                    f"{s} {a['accuracy']:.0%} / {a.get('similarity', 0):.0%}"
                    for s, a in accuracy.items()
                )
            )
    print(f"\n== done in {(time.monotonic() - started) / 60:.1f} min. Where to look:")
    print(f"  stages:  .venv/bin/llada-ray status {config}")
    print(f"  models:  {uri_of(fs, run_root)} (export: {export})")
    print(f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {cfg.tracking.uri}")
    print("  serve:   .venv/bin/llada-ray serve " + export)
    print(f"  lineage: {json.dumps(committed['export'].get('summary', {}).get('registered'))}")
    return 0


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False


if __name__ == "__main__":
    sys.exit(main())
