"""A pipeline config as the ordered list of runs it trains: one per stage, one per CPT phase.

Each `Unit` is one training run (or, for merge, one file operation) and starts from the output of
the unit before it. Consecutive runs share one worker group (one Ray Train run, `Unit.trainer`):
those before the merge, and those after it. Between CPT phases the block size and learning rate
switch in the loop and the optimizer carries on in memory.
Pure Python: the CLI and the jobs plan without importing torch or Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from llada_ray.config import (
    ArPretrainStage,
    ArSftStage,
    CapStage,
    CptStage,
    DpoStage,
    MergeStage,
    PipelineConfig,
    SftStage,
    TrainingStage,
)
from llada_ray.data.chat import rows_name
from llada_ray.diffusion.schedule import plan_phases

RunKind = Literal["ar", "bd", "stable", "sft", "cap", "dpo", "merge", "ar_sft"]


@dataclass(frozen=True)
class Unit:
    name: str  # "ar_pretrain", "cpt-<phase>", "merge", "sft", "cap", "dpo", "ar_sft"
    objective: RunKind
    stage: ArPretrainStage | CptStage | MergeStage | SftStage | CapStage | DpoStage | ArSftStage
    data: str | None  # key of the packed data it reads (see data.pack.pack_all)
    block_size: int | None = None
    tokens: int | None = None  # token budget (ar, cpt); None: epochs over the rows
    lr: float | None = None
    first_of_stage: bool = True  # warmup, embedding noise; later CPT phases carry state on
    starts_from: str | None = None  # the run whose output it starts from; None: model.source
    epochs: float | None = None  # epochs over the rows, when there is no token budget

    @property
    def baseline(self) -> bool:
        """A side branch (the AR baseline): the diffusion model does not continue from it."""
        return self.objective == "ar_sft"

    @property
    def training(self) -> TrainingStage | None:
        return self.stage if isinstance(self.stage, TrainingStage) else None

    @property
    def cpt(self) -> bool:
        """A CPT phase: it hands its weights and optimizer on to the next phase in memory."""
        return self.objective in ("bd", "stable")

    @property
    def trainer(self) -> str:
        """The worker group (one Ray Train run) it trains in, with the runs around it: the runs
        up to the merge (AR pre-training, the CPT phases) and the runs after it."""
        return "pretrain" if self.objective in ("ar", "bd", "stable") else "posttrain"

    @property
    def run_dir(self) -> str:
        """Its checkpoints' directory under `<pipeline>/train/`."""
        return f"{self.trainer}/{self.name}"

    @property
    def carries_optimizer(self) -> bool:
        """CPT phases continue the previous phase's optimizer; every other run starts afresh."""
        return self.cpt and not self.first_of_stage


def units(cfg: PipelineConfig) -> list[Unit]:
    """The runs in order; each starts from the run before it, but the AR baseline, which starts
    from the AR parent."""
    out: list[Unit] = []
    for unit in _units(cfg):
        if unit.baseline:
            parent = next((u.name for u in out if u.objective == "ar"), None)
        else:
            parent = next((u.name for u in reversed(out) if not u.baseline), None)
        out.append(dataclasses.replace(unit, starts_from=parent))
    return out


def _units(cfg: PipelineConfig) -> list[Unit]:
    out: list[Unit] = []
    sft = next((s for s in cfg.stages if type(s) is SftStage), None)
    for stage in cfg.stages:
        if isinstance(stage, ArPretrainStage):
            out.append(Unit("ar_pretrain", "ar", stage, "pretrain", 1, stage.tokens, stage.lr))
        elif isinstance(stage, CptStage):
            phases = [(p.name, p.block_size, p.tokens, p.lr) for p in stage.phases]
            for i, phase in enumerate(plan_phases(phases, cfg.data.seq_len)):
                objective: RunKind = "stable" if phase.kind == "stable" else "bd"
                out.append(
                    Unit(
                        f"cpt-{phase.name}",
                        objective,
                        stage,
                        "pretrain",
                        phase.block_size,
                        phase.tokens,
                        phase.lr,
                        first_of_stage=i == 0,
                    )
                )
        elif isinstance(stage, MergeStage):
            out.append(Unit("merge", "merge", stage, None))
        elif isinstance(stage, DpoStage):
            lr = stage.lr if stage.lr is not None else _final_lr(out)
            data = rows_name("dpo", stage.block_size, stage.max_len)
            out.append(
                Unit("dpo", "dpo", stage, data, stage.block_size, None, lr, epochs=stage.epochs)
            )
        elif isinstance(stage, ArSftStage):
            assert sft is not None  # the config guarantees it
            data = rows_name("sft", sft.block_size, sft.max_len)
            epochs = stage.epochs if stage.epochs is not None else sft.epochs
            out.append(Unit("ar_sft", "ar_sft", stage, data, 1, None, stage.lr, epochs=epochs))
        else:  # SftStage or CapStage
            data = rows_name("sft", stage.block_size, stage.max_len)
            out.append(
                Unit(
                    stage.stage,
                    stage.stage,
                    stage,
                    data,
                    stage.block_size,
                    None,
                    stage.lr,
                    epochs=stage.epochs,
                )
            )
    return out


def _final_lr(before: list[Unit]) -> float:
    """The rate the last training run ended on (DPO starts there, RECIPE.md §4)."""
    for unit in reversed(before):
        if unit.training is not None and unit.lr is not None:
            if unit.training.lr_schedule == "cosine":
                return unit.lr * unit.training.min_lr_ratio
            return unit.lr
    raise ValueError("stage dpo without lr needs a training stage before it to take the rate from")


def served_block_size(cfg: PipelineConfig) -> int | None:
    """The block size the exported model last trained at: the one it is served and evaluated
    with (recorded in the export's lineage.json); None for a pipeline with no block stage."""
    trained = (u.block_size for u in reversed(units(cfg)) if u.block_size and not u.baseline)
    return next(trained, None)


def find_unit(cfg: PipelineConfig, name: str) -> Unit:
    plan = units(cfg)
    for unit in plan:
        if unit.name == name:
            return unit
    raise ValueError(f"no run named {name!r} in pipeline {cfg.name!r}: {[u.name for u in plan]}")


def phase_range(cfg: PipelineConfig, spec: str) -> list[Unit]:
    """The CPT phases `FIRST:LAST` (inclusive, plan order), or the one phase `NAME`."""
    phases = [u for u in units(cfg) if u.cpt]
    names = [u.name.removeprefix("cpt-") for u in phases]
    first, _, last = spec.partition(":")
    last = last or first
    if first not in names or last not in names:
        raise ValueError(f"the pipeline has no phase {spec!r} of stage cpt (its phases: {names})")
    if names.index(first) > names.index(last):
        raise ValueError(f"phase range {spec!r} runs backwards (the phases: {names})")
    return phases[names.index(first) : names.index(last) + 1]


def input_unit(cfg: PipelineConfig, unit: Unit) -> Unit | None:
    """The run whose output `unit` starts from (None: it starts from model.source)."""
    return None if unit.starts_from is None else find_unit(cfg, unit.starts_from)


def total_steps(unit: Unit, cfg: PipelineConfig, train_rows: int, world_size: int) -> int:
    """Optimizer steps of a run: its token budget, or epochs over the training rows."""
    stage = unit.training
    assert stage is not None, unit.name
    global_batch = stage.micro_batch_size * stage.grad_accumulation * max(world_size, 1)
    if unit.tokens is not None:
        return max(1, math.ceil(unit.tokens / (global_batch * cfg.data.seq_len)))
    assert unit.epochs is not None, unit.name
    return max(1, math.ceil(unit.epochs * train_rows / global_batch))


def learning_rate(unit: Unit, step: int, steps: int) -> float:
    """Rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    stage = unit.training
    assert stage is not None and unit.lr is not None, unit.name
    warmup = stage.warmup_steps if unit.first_of_stage else 0
    if step < warmup:
        return unit.lr * (step + 1) / warmup
    if stage.lr_schedule == "constant":
        return unit.lr
    progress = (step - warmup) / max(1, steps - warmup - 1)
    floor = unit.lr * stage.min_lr_ratio
    return floor + (unit.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
