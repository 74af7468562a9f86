"""The tiny pipeline end to end: wall time per stage, and what the scheduler itself costs.

Measures the committed run of configs/tiny.yaml in its own storage (runs/, as `make demo` leaves
it); runs the pipeline first when it is not complete (committed stages are skipped). Per stage:
wall time (its manifest), and for training runs the start-up before the first step (manifest
start → the run's step-0 validation in MLflow: Ray Train worker group, model init, data load).
Scheduler bookkeeping = the pipeline's wall time (first start → last finish) minus the stages'
own wall times: manifest reads and writes, the MLflow parent run, gaps between stages.
Overhead = run start-ups + bookkeeping, as a share of the pipeline's wall time.

    python bench/pipeline.py   → bench/results/pipeline.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from llada_ray import tracking
from llada_ray.config import PipelineConfig, load_config
from llada_ray.pipeline import manifests
from llada_ray.pipeline.graph import stage_graph
from llada_ray.pipeline.scheduler import run_pipeline
from llada_ray.train.outputs import pipeline_root

ROOT = Path(__file__).resolve().parent.parent


def startup_seconds(client: MlflowClient, cfg: PipelineConfig, stage: str, began: str) -> float:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run = tracking.latest_run(client, experiment.experiment_id, cfg, stage)
    history = client.get_metric_history(run.info.run_id, "val_loss") if run else []
    if not history:
        return 0.0
    first = min(m.timestamp for m in history) / 1000
    return max(0.0, first - datetime.fromisoformat(began).timestamp())


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    cfg = load_config(ROOT / "configs" / "tiny.yaml").anchored(ROOT)
    fs, run_root = pipeline_root(cfg)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        run_pipeline(cfg, say=lambda line: print(line, flush=True))
    finally:
        ray.shutdown()
    committed = manifests.read_all(fs, run_root)
    client = MlflowClient(tracking.resolve_uri(cfg.tracking.uri))
    order = [s.name for s in stage_graph(cfg)]
    stages = {}
    for name in order:
        m = committed[name]
        start = startup_seconds(client, cfg, name, m["started"]) if m["kind"] == "train" else 0.0
        stages[name] = {
            "kind": m["kind"],
            "seconds": m["seconds"],
            "startup_s": start,
            "summary": m["summary"],
        }
    began = min(datetime.fromisoformat(committed[n]["started"]) for n in order)
    ended = max(datetime.fromisoformat(committed[n]["finished"]) for n in order)
    total = (ended - began).total_seconds()
    bookkeeping = max(0.0, total - sum(s["seconds"] for s in stages.values()))
    startup = sum(s["startup_s"] for s in stages.values())
    share = (startup + bookkeeping) / total
    report = {
        "setup": {
            "config": "configs/tiny.yaml",
            "cpus": os.cpu_count(),
            "workers": cfg.scaling.num_workers,
        },
        "total_seconds": total,
        "scheduler_bookkeeping_s": bookkeeping,
        "run_startup_s": startup,
        "stages": stages,
        "targets": {
            "scheduler_overhead_share": {
                "value": share,
                "goal": 0.10,
                "higher_is_better": False,
                "met": share <= 0.10,
                "note": "run start-up (Ray Train worker group, model init, data) + bookkeeping",
            }
        },
    }
    out = ROOT / "bench" / "results" / "pipeline.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'stage':<16}{'kind':<8}{'wall s':>8}{'start-up s':>12}")
    for name, st in stages.items():
        print(f"{name:<16}{st['kind']:<8}{st['seconds']:>8.1f}{st['startup_s']:>12.1f}")
    print(
        f"total {total:.1f} s; scheduler bookkeeping {bookkeeping:.2f} s; "
        f"run start-up {startup:.1f} s; overhead share {share:.1%} (goal ≤ 10%)"
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
