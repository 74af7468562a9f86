"""A pipeline config as its ordered stage graph, each stage with the hash of what defines it.

pack → [ar_pretrain] → cpt-<phase>… → merge → sft → cap → dpo → [ar_sft] → export. Every stage
starts from the one before it (the AR baseline ar_sft from the AR parent), so a stage's hash chains
its own settings with the hash of the stage it starts from: a change anywhere upstream changes
every hash after it, and a committed stage whose hash no longer matches was built from something
else. Pure Python (no torch, no Ray).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from llada_ray.config import PipelineConfig
from llada_ray.train.plan import Unit, units

StageKind = Literal["pack", "train", "merge", "export"]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: StageKind
    unit: Unit | None
    config_hash: str


def _digest(previous: str, settings: dict) -> str:
    text = json.dumps({"after": previous, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(cfg: PipelineConfig, unit: Unit) -> dict:
    """What a run's result depends on. Storage, tracking and retries do not change it; the
    worker count does (it sets the global batch and the sample order), and so does the editing
    stream where it trains (only there: the hashes of runs without it stay what they were)."""
    editing = cfg.edits(unit.stage.stage)
    extra = {"editing": editing.model_dump(mode="json", exclude={"stages"})} if editing else {}
    return extra | {
        "run": unit.name,
        "objective": unit.objective,
        "block_size": unit.block_size,
        "tokens": unit.tokens,
        "lr": unit.lr,
        "first_of_stage": unit.first_of_stage,
        "data": unit.data,
        "epochs": unit.epochs,
        "stage": unit.stage.model_dump(mode="json", exclude={"phases"}),
        "workers": cfg.scaling.num_workers,
        "strategy": cfg.scaling.strategy,
    }


def stage_graph(cfg: PipelineConfig) -> list[Stage]:
    data = {
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
    }
    previous = packed = _digest("", data)
    graph = [Stage("pack", "pack", None, previous)]
    hashes: dict[str, str] = {}
    for unit in units(cfg):
        start = hashes[unit.starts_from] if unit.starts_from else packed
        previous = hashes[unit.name] = _digest(start, _settings(cfg, unit))
        kind: StageKind = "merge" if unit.objective == "merge" else "train"
        graph.append(Stage(unit.name, kind, unit, previous))
    graph.append(Stage("export", "export", None, _digest(previous, {"export": True})))
    return graph


def find_stage(graph: list[Stage], name: str) -> Stage:
    for stage in graph:
        if stage.name == name:
            return stage
    raise ValueError(f"no stage {name!r}; the stages are {[s.name for s in graph]}")
