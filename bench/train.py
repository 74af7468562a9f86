"""Training throughput per phase kind, the share of wall time spent checkpointing, and what
scale needs: bounded worker memory, per-rank checkpoints and resharded resume.

The tiny default model (configs/tiny.yaml: Qwen3-shaped, hidden 128, 4 layers, rows of 256
tokens, micro-batch 16) on 2 Ray Train workers (DDP over gloo), one run per kind: AR (causal),
BD at block 32 (input [xt ; x0], 512 tokens), stable / MDLM (xt alone). Checkpoints at the
default interval (every 50 steps, uploaded asynchronously). tokens/s is the median over steps
of real tokens per optimizer step / step wall time (from the MLflow history); the checkpoint share
is the time the loop spent checkpointing (gather, write, hash, report; the upload itself runs in
the background) / the run's training wall time.

Scale (`--only scale` runs just these; the tiny model, 2 workers, checkpoints every 5 steps):
- per-worker peak RSS (the max over ranks of ru_maxrss, logged by the loop) training on a packed
  corpus and on one 10× larger, same model and steps;
- bytes each rank writes per checkpoint under 2-worker FSDP (DCP shards carry the writing rank
  in their names; everything else is rank 0's), non-final and final (+ the HF export);
- FSDP resumed 2 → 1 worker (accumulating 2) → 2, against an uninterrupted run: the largest
  weight difference, the final validation loss, the training loss of every resumed step;
- a 2-worker resume on the same world size: final weights bit-identical.

    python bench/train.py [--quick] [--only throughput|scale]  → bench/results/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from llada_ray.config import PipelineConfig, TrainingStage
from llada_ray.train import checkpoint
from llada_ray.train.outputs import output_of, pipeline_root, run_path
from llada_ray.train.plan import find_unit, units
from llada_ray.train.run import run_unit

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"ar_pretrain": "AR (causal)", "cpt-b32": "BD block 32", "cpt-stable": "stable / MDLM"}


def bench_config(work: Path, steps: int) -> PipelineConfig:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    workers, micro, seq_len = 2, 16, raw["data"]["seq_len"]
    tokens = steps * workers * micro * seq_len
    raw["data"]["pretrain"] = [{"type": "task", "examples": 12_000}]
    raw["stages"] = [
        {"stage": "ar_pretrain", "tokens": tokens, "micro_batch_size": micro},
        {
            "stage": "cpt",
            "micro_batch_size": micro,
            "phases": [
                {"name": "b32", "block_size": 32, "tokens": tokens, "lr": 5e-4},
                {"name": "stable", "block_size": seq_len, "tokens": tokens, "lr": 5e-4},
            ],
        },
    ]
    raw["storage"] = {"root": str(work / "runs")}
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench"}
    raw["scaling"] = {"num_workers": workers}
    return PipelineConfig.model_validate(raw)


def throughput(work: Path, steps: int) -> tuple[dict, dict]:
    """Tokens/s and checkpoint share of each kind: (runs, target)."""
    results = {}
    cfg = bench_config(work, steps)
    client = MlflowClient(cfg.tracking.uri)
    for unit in units(cfg):
        outcome = run_unit(cfg, unit)
        run_id = _mlflow_run(client, "bench", unit.name)
        rates = [m.value for m in client.get_metric_history(run_id, "tokens_per_s")]
        stamps = [m.timestamp for m in client.get_metric_history(run_id, "lr")]
        vals = client.get_metric_history(run_id, "val_loss")
        first_val = min(vals, key=lambda m: m.step)
        # Training wall time: from the step-0 validation to the last step's metrics.
        wall = (max(stamps) - first_val.timestamp) / 1000
        # Logged after each checkpoint is reported, so the last value holds all of them.
        saving = client.get_metric_history(run_id, "checkpoint_seconds")
        checkpoint_seconds = max(saving, key=lambda m: m.step).value
        results[unit.name] = {
            "kind": KINDS[unit.name],
            "steps": outcome.manifest["step"],
            "tokens": outcome.manifest["tokens"],
            "tokens_per_s": statistics.median(rates[1:]),  # step 1 includes warm-up
            "train_wall_s": wall,
            "checkpoints": -(-outcome.manifest["step"] // unit.training.checkpoint_every_steps),
            "checkpoint_seconds": checkpoint_seconds,
            "checkpoint_share": checkpoint_seconds / wall,
            "run_seconds": outcome.seconds,
        }
    worst = max(r["checkpoint_share"] for r in results.values())
    target = {
        "value": round(worst, 4),
        "goal": 0.10,
        "higher_is_better": False,
        "met": worst <= 0.10,
        "note": "worst of the three kinds",
    }
    return results, target


def _mlflow_run(client: MlflowClient, experiment: str, name: str) -> str:
    """The newest MLflow run of `name`."""
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.`llada_ray.run` = '{name}'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id


def scale_config(work: Path, name: str, examples: int, scaling: dict, **stage: object):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["name"] = name
    raw["data"]["pretrain"] = [{"type": "task", "examples": examples}]
    every = {"checkpoint_every_steps": 5, "eval_every_steps": 5, "eval_rows": 32}
    raw["stages"] = [{"stage": "ar_pretrain", "micro_batch_size": 8, "keep_top_k": 10,
                      "tokens": 15 * 16 * raw["data"]["seq_len"], **every, **stage}]  # fmt: skip
    raw["storage"] = {"root": str(work / "runs")}
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "scale"}
    raw["scaling"] = scaling
    return PipelineConfig.model_validate(raw)


def _weights(cfg: PipelineConfig) -> dict[str, torch.Tensor]:
    fs, run_root = pipeline_root(cfg)
    out = output_of(fs, run_root, find_unit(cfg, "ar_pretrain"))
    try:
        return load_file(out.local / "model.safetensors")
    finally:
        out.cleanup()


def _rewind(cfg: PipelineConfig, step: int) -> None:
    """Uncommit every checkpoint after `step`, as if the run had died there."""
    fs, run_root = pipeline_root(cfg)
    for path, m in checkpoint.read_manifests(fs, run_path(run_root, find_unit(cfg, "ar_pretrain"))):
        if m["step"] > step:
            fs.delete_file(f"{path}/{checkpoint.MANIFEST}")


def _rank_bytes(manifest: dict) -> dict[int, int]:
    """Bytes per writing rank: DCP shards are named __<rank>_<n>.distcp; the rest is rank 0's."""
    out: dict[int, int] = {}
    for rel, f in manifest["files"].items():
        name = rel.rsplit("/", 1)[-1]
        rank = int(name[2:].split("_")[0]) if name.endswith(".distcp") else 0
        out[rank] = out.get(rank, 0) + f["bytes"]
    return out


def scale(work: Path, examples: int) -> tuple[dict, dict]:
    """The scale figures and their targets (see the module docstring)."""
    figures: dict = {}
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")

    # Worker memory against corpus size.
    memory = {}
    for label, n in (("1x", examples), ("10x", 10 * examples)):
        cfg = scale_config(work, f"corpus-{label}", n, {"num_workers": 2})
        out = run_unit(cfg, find_unit(cfg, "ar_pretrain"))
        rss = client.get_metric_history(_mlflow_run(client, "scale", "ar_pretrain"), "peak_rss_mb")
        memory[label] = {"examples": n, "peak_rss_mb": max(m.value for m in rss),
                         "tokens_trained": out.manifest["tokens"]}  # fmt: skip
    for label in memory:
        fs, run_root = pipeline_root(scale_config(work, f"corpus-{label}", 1, {}))
        data = json.loads(Path(run_root, "data/pretrain/manifest.json").read_text())
        memory[label] |= {
            "packed_rows": data["rows"],
            "packed_bytes": sum(s["bytes"] for s in data["shards"]),
        }
    rss_ratio = memory["10x"]["peak_rss_mb"] / memory["1x"]["peak_rss_mb"]
    figures["worker_memory"] = memory

    # FSDP: bytes per rank, then 2 → 1 → 2 workers against an uninterrupted run.
    fsdp = {"strategy": "fsdp"}
    two = scale_config(work, "reshard", examples, {"num_workers": 2, **fsdp})
    one = scale_config(work, "reshard", examples, {"num_workers": 1, **fsdp}, grad_accumulation=2)
    reference = run_unit(two, find_unit(two, "ar_pretrain"))
    fs, run_root = pipeline_root(two)
    written = checkpoint.read_manifests(fs, run_path(run_root, find_unit(two, "ar_pretrain")))
    per_rank = {m["step"]: _rank_bytes(m) for _, m in written}
    shares = {step: b.get(0, 0) / sum(b.values()) for step, b in per_rank.items()}
    final_step = max(shares)
    figures["fsdp_checkpoint_bytes"] = {
        str(step): {"per_rank": {str(r): n for r, n in sorted(b.items())},
                    "rank0_share": round(shares[step], 4), "final": step == final_step}
        for step, b in sorted(per_rank.items())
    }  # fmt: skip
    worst_nonfinal = max(v for step, v in shares.items() if step != final_step)
    before = _weights(two)
    ref_loss = {m.step: m.value for m in client.get_metric_history(
        _mlflow_run(client, "scale", "ar_pretrain"), "loss")}  # fmt: skip

    def resumed(cfg: PipelineConfig, step: int) -> dict:
        _rewind(cfg, step)
        out = run_unit(cfg, find_unit(cfg, "ar_pretrain"))
        after = _weights(cfg)
        losses = client.get_metric_history(_mlflow_run(client, "scale", "ar_pretrain"), "loss")
        return {
            "resumed_from": out.manifest["resumed_from"],
            "world_size": out.manifest["world_size"],
            "max_abs_weight_diff": max(float((after[k] - before[k]).abs().max()) for k in before),
            "val_loss": out.manifest["val_loss"],
            "reference_val_loss": reference.manifest["val_loss"],
            "max_rel_loss_diff_per_step": max(
                abs(m.value - ref_loss[m.step]) / abs(ref_loss[m.step]) for m in losses
            ),
            "steps_compared": len(losses),
        }

    figures["fsdp_resume_2_to_1"] = to_one = resumed(one, 5)
    figures["fsdp_resume_1_to_2"] = to_two = resumed(two, 10)
    same = scale_config(work, "same", examples, {"num_workers": 2, **fsdp})
    run_unit(same, find_unit(same, "ar_pretrain"))
    uninterrupted = _weights(same)
    _rewind(same, 5)
    run_unit(same, find_unit(same, "ar_pretrain"))
    again = _weights(same)
    identical = all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)
    figures["same_world_size_resume_bit_identical"] = identical
    loss_diff = max(to_one["max_rel_loss_diff_per_step"], to_two["max_rel_loss_diff_per_step"])
    resharded_ok = all(
        r["resumed_from"] in (5, 10) and r["max_rel_loss_diff_per_step"] < 1e-3
        for r in (to_one, to_two)
    )
    targets = {
        "peak_rss_10x_corpus_ratio": {"value": round(rss_ratio, 3), "goal": 1.2,
                                      "higher_is_better": False, "met": rss_ratio <= 1.2},
        "fsdp_rank0_share_of_checkpoint_bytes": {
            "value": round(worst_nonfinal, 4), "goal": 0.6, "higher_is_better": False,
            "met": worst_nonfinal <= 0.6,
            "note": f"checkpoints before the last; the final one, with the HF export rank 0 "
                    f"writes alone: {shares[final_step]:.3f}"},
        "fsdp_resume_2_1_2_workers": {
            "value": loss_diff,
            "goal": 1e-3, "higher_is_better": False, "met": resharded_ok,
            "note": "largest relative difference of a resumed step's training loss"},
        "same_world_size_resume_bit_identical": {"value": identical, "goal": True,
                                                 "met": identical},
    }  # fmt: skip
    return figures, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 steps per kind instead of 150")
    parser.add_argument("--only", choices=["throughput", "scale"], help="one half of the bench")
    args = parser.parse_args()
    steps = 50 if args.quick else 150
    out = ROOT / "bench" / "results" / "train.json"
    report = json.loads(out.read_text()) if out.exists() else {"targets": {}}

    work = Path(tempfile.mkdtemp(prefix="lr-bench-train-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        if args.only != "scale":
            runs, target = throughput(work / "throughput", steps)
            report["runs"], report["targets"]["checkpoint_share_of_wall_time"] = runs, target
            report["setup"] = {
                "model": "tiny (configs/tiny.yaml): qwen3, hidden 128, 4 layers, vocab 1024",
                "seq_len": 256,
                "micro_batch_size": 16,
                "workers": 2,
                "strategy": "ddp (gloo, CPU)",
                "cpus": os.cpu_count(),
                "steps_per_kind": steps,
                "checkpoint_every_steps": TrainingStage.model_fields[
                    "checkpoint_every_steps"
                ].default,
            }
        if args.only != "throughput":
            figures, targets = scale(work / "scale", examples=2_000 if args.quick else 20_000)
            report["scale"] = figures
            report["targets"] |= targets
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    out.write_text(json.dumps(report, indent=2) + "\n")
    if "runs" in report:
        print(
            f"\n{'run':<14}{'kind':<16}{'steps':>6}{'tokens/s':>11}{'wall s':>8}{'ckpt s':>8}"
            f"{'ckpt share':>12}"
        )
        for name, r in report["runs"].items():
            print(
                f"{name:<14}{r['kind']:<16}{r['steps']:>6}{r['tokens_per_s']:>11,.0f}"
                f"{r['train_wall_s']:>8.1f}{r['checkpoint_seconds']:>8.2f}"
                f"{r['checkpoint_share']:>12.2%}"
            )
    if "scale" in report:
        for label, m in report["scale"]["worker_memory"].items():
            print(
                f"corpus {label:<4} {m['packed_rows']:>8} rows  peak RSS {m['peak_rss_mb']:.0f} MiB"
            )
        for step, c in report["scale"]["fsdp_checkpoint_bytes"].items():
            print(f"fsdp checkpoint {step:>3}: bytes per rank {c['per_rank']}  "
                  f"rank 0 {c['rank0_share']:.1%}{'  (final)' if c['final'] else ''}")  # fmt: skip
    print(f"\n{'target':<40}{'value':>12}{'goal':>10}  met")
    for name, t in report["targets"].items():
        print(f"{name:<40}{t['value']!s:>12}{t['goal']!s:>10}  {t['met']}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
