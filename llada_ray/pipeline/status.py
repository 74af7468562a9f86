"""The stage table of a pipeline, from its manifests (also while it runs)."""

from __future__ import annotations

from llada_ray.config import PipelineConfig
from llada_ray.pipeline import manifests
from llada_ray.pipeline.graph import stage_graph
from llada_ray.pipeline.lineage import uri_of
from llada_ray.train import checkpoint
from llada_ray.train.outputs import pipeline_root, run_path


def stage_table(cfg: PipelineConfig) -> list[dict]:
    fs, run_root = pipeline_root(cfg)
    committed = manifests.read_all(fs, run_root)
    rows = []
    for stage in stage_graph(cfg):
        m = committed.get(stage.name)
        row = {
            "stage": stage.name,
            "state": "pending",
            "output": None,
            "tokens": None,
            "val_loss": None,
            "seconds": None,
        }
        if m is not None:
            summary = m.get("summary") or {}
            changed = m["config_hash"] != stage.config_hash
            row |= {
                "state": "changed" if changed else "committed",
                "output": uri_of(fs, m["output"]) if m.get("output") else None,
                "tokens": summary.get("tokens"),
                "val_loss": summary.get("val_loss"),
                "seconds": m.get("seconds"),
            }
        elif stage.kind == "train" and stage.unit is not None:
            # Not committed: its newest checkpoint tells how far a running (or stopped) run got.
            saved = checkpoint.read_manifests(fs, run_path(run_root, stage.unit))
            if saved:
                path, newest = max(saved, key=lambda pm: pm[1].get("step", 0))
                row |= {
                    "state": "in progress",
                    "output": uri_of(fs, path),
                    "tokens": newest.get("tokens"),
                    "val_loss": newest.get("val_loss"),
                }
        rows.append(row)
    return rows


def render(cfg: PipelineConfig) -> str:
    lines = [
        f"pipeline {cfg.name!r}",
        f"{'stage':<16}{'state':<13}{'tokens':>12}{'val loss':>10}{'wall s':>9}  output",
    ]
    for r in stage_table(cfg):
        tokens = f"{r['tokens']:,}" if r["tokens"] is not None else "-"
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        wall = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        lines.append(
            f"{r['stage']:<16}{r['state']:<13}{tokens:>12}{loss:>10}{wall:>9}  {r['output'] or '-'}"
        )
    return "\n".join(lines)
