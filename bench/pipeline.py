"""The tiny pipeline end to end: wall time per stage, and what the scheduler itself costs.

Runs configs/tiny.yaml (storage and MLflow in a fresh temp dir) with the scheduler in this
process. Per stage: wall time (from its manifest), and for training runs the start-up before the
first step (manifest start → the run's step-0 validation in MLflow: Ray Train worker group,
model init, data load). Overhead = start-up of every run + the scheduler's own bookkeeping
(manifest reads and writes, MLflow parent run, export bookkeeping), as a share of the total.

    python bench/pipeline.py [--quick]   → bench/results/pipeline.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import ray
import yaml
from mlflow.tracking import MlflowClient

from llada_ray import tracking
from llada_ray.config import PipelineConfig
from llada_ray.pipeline import manifests
from llada_ray.pipeline.scheduler import run_pipeline
from llada_ray.train.run import pipeline_root

ROOT = Path(__file__).resolve().parent.parent


def startup_seconds(client: MlflowClient, cfg: PipelineConfig, stage: str, began: str) -> float:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.PIPELINE_TAG}` = '{cfg.name}' and "
        f"tags.`{tracking.RUN_TAG}` = '{stage}'",
    )
    history = client.get_metric_history(runs[0].info.run_id, "val_loss") if runs else []
    if not history:
        return 0.0
    first = min(m.timestamp for m in history) / 1000
    return max(0.0, first - datetime.fromisoformat(began).timestamp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the token budgets")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lr-bench-pipeline-"))
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"] = {"root": str(work / "runs")}
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench"}
    if args.quick:
        for stage in raw["stages"]:
            for phase in stage.get("phases", []):
                phase["tokens"] //= 10
            if "tokens" in stage:
                stage["tokens"] //= 10
            if "epochs" in stage or stage["stage"] in ("sft", "cap", "dpo"):
                stage["epochs"] = 0.1
    cfg = PipelineConfig.model_validate(raw)
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        outcome = run_pipeline(cfg, say=lambda line: print(line, flush=True))
        total = time.perf_counter() - started
        ray.shutdown()
        fs, run_root = pipeline_root(cfg)
        committed = manifests.read_all(fs, run_root)
        client = MlflowClient(tracking.resolve_uri(cfg.tracking.uri))
        stages = {}
        for name in outcome.ran:
            m = committed[name]
            start = startup_seconds(client, cfg, name, m["started"]) if m["kind"] == "train" else 0
            stages[name] = {
                "kind": m["kind"],
                "seconds": m["seconds"],
                "startup_s": start,
                "summary": m["summary"],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    startup = sum(s["startup_s"] for s in stages.values())
    share = (startup + outcome.overhead_seconds) / total
    report = {
        "setup": {
            "config": "configs/tiny.yaml" + (" (quick: budgets / 10)" if args.quick else ""),
            "cpus": os.cpu_count(),
            "workers": cfg.scaling.num_workers,
        },
        "total_seconds": total,
        "scheduler_bookkeeping_s": outcome.overhead_seconds,
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
    for name, s in stages.items():
        print(f"{name:<16}{s['kind']:<8}{s['seconds']:>8.1f}{s['startup_s']:>12.1f}")
    print(
        f"total {total:.1f} s; scheduler bookkeeping {outcome.overhead_seconds:.2f} s; "
        f"run start-up {startup:.1f} s; overhead share {share:.1%} (goal ≤ 10%)"
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
