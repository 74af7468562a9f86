"""The one training loop every Ray Train worker runs, for every stage (see train.plan).

A step is a pure function of (weights, optimizer state, seed, run, step): the samples come from
their global index (train.batches) and every random draw from a generator seeded by the
micro-batch's first sample. So a run restarted from its checkpoint at step s continues exactly as
if it had never stopped, and, to float rounding, also under another number of workers that keeps
the global batch. A worker group trains one run, or the CPT phases one after another.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import (
    PreTrainedTokenizerBase,
)

from llada_ray.config import CptStage, PipelineConfig, TrainingStage
from llada_ray.data.corpus import load_tokenizer
from llada_ray.diffusion.noise import embedding_noise_std
from llada_ray.model import (
    DiffusionLM,
    embedding_rms,
)
from llada_ray.model.io import save_weights
from llada_ray.progress import RunProgress
from llada_ray.storage import storage_root
from llada_ray.train import checkpoint
from llada_ray.train.batches import RowStore, micro_batch_index
from llada_ray.train.engine import Engine
from llada_ray.train.objectives import Objective, objective_for
from llada_ray.train.outputs import input_of, run_path
from llada_ray.train.plan import Unit, find_unit, learning_rate, total_steps, units
from llada_ray.train.start import restore, start

log = logging.getLogger(__name__)


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each figure over the ranks (keys are the same on every rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)  # NCCL: GPU
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def _peak_rss_mb(device: torch.device) -> float:
    """The largest peak resident memory of any rank's process so far, in MiB."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


@dataclass
class Position:
    """Where a run stands; stored in every checkpoint manifest."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    embed_noise_std: float = 0.0
    checkpoint_seconds: float = 0.0
    resumed_from: int | None = None  # the checkpoint step this attempt started from
    started: float = 0.0  # when the run began (its first attempt), unix time


class MetricLog:
    """Rank 0 → MLflow over the tracking URI, by global step; a no-op elsewhere / untracked.

    A tracking server that is down costs a warning, not the run.
    """

    def __init__(self, uri: str | None, run_id: str | None, rank: int) -> None:
        self.client, self.run_id = None, None
        if uri and run_id and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
            )
        except Exception as err:  # any tracking failure: keep training
            log.warning("MLflow logging failed at step %d: %s", step, err)


@dataclass
class Worker:
    """What every run of a worker group shares: config, storage, place in the group."""

    cfg: PipelineConfig
    payload: dict
    fs: pafs.FileSystem
    tokenizer: PreTrainedTokenizerBase
    rank: int
    world: int
    device: torch.device
    stores: dict[str, RowStore] = field(default_factory=dict)

    def store(self, unit: Unit) -> RowStore:
        """The rows `unit` reads (opened once per group: only manifests and footers)."""
        path = self.payload["data"][unit.name]["path"]
        if path not in self.stores:
            self.stores[path] = RowStore(self.fs, path, self.cfg.data.validation_fraction)
        return self.stores[path]


def train_loop(payload: dict) -> None:
    """The runs `payload["units"]` in order, in this one worker group. A run that already
    finished is skipped; one with checkpoints resumes from its newest; a CPT phase takes the
    engine (weights and optimizer) of the phase before it in memory, any other run starts from
    its input's committed output."""
    cfg = PipelineConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    fs, _ = storage_root(cfg.storage)
    torch.manual_seed(cfg.seed)
    w = Worker(
        cfg,
        payload,
        fs,
        load_tokenizer(fs, payload["tokenizer"]),
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.torch.get_device(),  # the CPU here; this worker's GPU with use_gpu
    )
    run_root = payload["run_root"]
    engine: Engine | None = None
    for name in payload["units"]:
        unit = find_unit(cfg, name)
        restored = restore(fs, run_path(run_root, unit))
        if restored and restored[1].get("final"):
            engine = None
            continue
        reference = None
        if engine is None or restored or not unit.carries_optimizer:
            engine = None  # the previous run's model goes before the next one is built
            init = input_of(cfg, fs, run_root, unit)
            engine, reference = start(cfg, unit, fs, restored, init, w.tokenizer, w.device)
        _train(w, unit, engine, reference, restored)


def _train(
    w: Worker,
    unit: Unit,
    engine: Engine,
    reference: DiffusionLM | None,
    restored: tuple[str, dict] | None,
) -> None:
    """One run from its restored position (or its start) to its final checkpoint."""
    cfg, stage, rank, world, device = w.cfg, unit.training, w.rank, w.world, w.device
    assert stage is not None
    # Masked-embedding noise: the first steps of the first CPT phase only (report §7.1).
    noise = stage.embed_noise if isinstance(stage, CptStage) and unit.first_of_stage else None
    noise_steps = noise.steps if noise else 0
    if restored:
        m = restored[1]
        pos = Position(
            m["step"],
            m["samples"],
            m["tokens"],
            m["embed_noise_std"],
            m["checkpoint_seconds"],
            resumed_from=m["step"],
            started=m["started"],
        )
    else:
        base = 0.0
        if noise and noise.steps:  # σ from the starting weights, kept in the manifest
            base = embedding_rms(engine.dlm.hf) if noise.std == "embedding_rms" else noise.std
        pos = Position(embed_noise_std=base, started=time.time())

    store = w.store(unit)
    steps = total_steps(unit, cfg, len(store.train_ids), world)
    objective = objective_for(
        unit,
        cfg,
        engine.dlm.mask_token_id,
        w.tokenizer.pad_token_id,
        w.tokenizer.eos_token_id,
        vocab_size=len(w.tokenizer),
        reference=reference,
        embed_noise=lambda s: embedding_noise_std(s, noise_steps, pos.embed_noise_std),
        device=device,
    )
    tracking = w.payload.get("tracking")
    tracking = tracking or {"uri": None, "runs": {}}
    metrics_log = MetricLog(tracking["uri"], tracking["runs"].get(unit.name), rank)
    # What a resume must match (checked by the driver before it submits, run.check_resumable).
    identity = {
        "world_size": world,
        "strategy": cfg.scaling.strategy,
        "format": "deepspeed" if cfg.scaling.strategy == "deepspeed" else "dcp",
        "global_batch": stage.micro_batch_size * stage.grad_accumulation * world,
        "seq_len": cfg.data.seq_len,
        "data": w.payload["data"][unit.name]["digest"],
    }
    # Retention (Ray Train keeps the best scores + the latest): every run's final checkpoint
    # first, then a later phase's checkpoints before an earlier one's, each by validation loss.
    phase = [u.name for u in units(cfg) if u.trainer == unit.trainer].index(unit.name)
    run_seed = _seed(cfg.seed, unit.name)

    def validate() -> dict[str, float]:
        return _validate(engine, objective, store, stage, rank, world, run_seed, device)

    if pos.step == 0:
        metrics_log.log({f"val_{k}": v for k, v in validate().items()}, 0)
    progress = RunProgress(unit.name, steps, pos.step) if rank == 0 else None
    if progress and restored:
        # Checkpoints the driver did not see at launch were written by this run's earlier
        # attempt: a worker was lost and Ray Train restarted the group.
        launched = w.payload["launched_at_step"].get(unit.name, 0)
        progress.resumed(pos.step, lost_worker=pos.step > launched)

    while pos.step < steps:
        started = time.perf_counter()
        lr = learning_rate(unit, pos.step, steps)
        engine.set_lr(lr)
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(stage.grad_accumulation):
            index = micro_batch_index(
                pos.step, micro, rank, world, stage.micro_batch_size, stage.grad_accumulation
            )
            rows = store.rows(store.train_sample(run_seed, index))
            # Draws keyed by the micro-batch's first global sample, not by rank: the same
            # samples get the same noise under any (workers, accumulation) of one global batch.
            torch.manual_seed(_seed(run_seed, int(index[0])))  # e.g. embedding noise
            gen = torch.Generator(device).manual_seed(_seed(run_seed, int(index[0]), "t"))
            with engine.autocast():
                out = objective(engine.model, rows, gen, pos.step)
            engine.backward(out.loss)
            tokens += out.tokens
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v / stage.grad_accumulation
        grad_norm = engine.finish_step()
        figures = _all_mean({**sums, "tokens": float(tokens)}, device)
        step_tokens = int(figures.pop("tokens") * world)
        pos.step += 1
        pos.samples += stage.micro_batch_size * stage.grad_accumulation * world
        pos.tokens += step_tokens
        elapsed = time.perf_counter() - started
        figures |= {
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": step_tokens / elapsed,
            "tokens_seen": pos.tokens,
            "block_size": unit.block_size or 0,
        }
        if pos.step <= noise_steps:
            figures["embed_noise_std"] = embedding_noise_std(
                pos.step - 1, noise_steps, pos.embed_noise_std
            )
        at_checkpoint = pos.step % stage.checkpoint_every_steps == 0 or pos.step == steps
        if at_checkpoint or pos.step % stage.eval_every_steps == 0:
            figures |= {f"val_{k}": v for k, v in validate().items()}
        metrics_log.log(figures, pos.step)
        if progress:
            progress.update(pos.step, figures)
        if at_checkpoint:
            score = 1e12 + phase if pos.step == steps else phase * 1e6 - figures["val_loss"]
            _save(engine, w.tokenizer, pos, figures, unit, cfg, steps, identity, score, rank, world)
            memory = {
                "checkpoint_seconds": pos.checkpoint_seconds,
                "peak_rss_mb": _peak_rss_mb(device),
            }
            metrics_log.log(memory, pos.step)


def _validate(
    engine: Engine,
    objective: Objective,
    store: RowStore,
    stage: TrainingStage,
    rank: int,
    world: int,
    run_seed: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean metrics over held-out micro-batches, with fixed noise draws so passes are
    comparable, and the same batches and draws under any world size.

    Every rank runs the same number of forwards (sharded models run collectives in forward): a
    rank past the last batch runs one again and does not count it.
    """
    ids = store.val_ids if len(store.val_ids) else store.train_ids
    micro = stage.micro_batch_size
    total = max(1, min(stage.eval_rows, len(ids)) // micro)
    sums: dict[str, float] = {}
    engine.model.eval()
    with torch.no_grad():
        for b in range(math.ceil(total / world)):
            index = b * world + rank
            start = (index % total) * micro
            rows = store.rows(ids[np.arange(start, start + micro) % len(ids)])
            gen = torch.Generator(device).manual_seed(_seed(run_seed, "val", start))
            with engine.autocast():
                out = objective(engine.model, rows, gen, 1 << 30)  # past the embedding noise
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + (v if index < total else 0.0)
    engine.model.train()
    return {k: v * world / total for k, v in _all_mean(sums, device).items()}


def _save(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    pos: Position,
    figures: dict[str, float],
    unit: Unit,
    cfg: PipelineConfig,
    steps: int,
    identity: dict,
    keep: float,
    rank: int,
    world: int,
) -> None:
    """Write this rank's part of the checkpoint, the manifest (rank 0, last) and report it.

    Every rank writes its own trainer-state shard; rank 0 adds the config (and, at the run's
    final step only, the HF export: the one time full weights are gathered)."""
    started = time.perf_counter()
    local = Path(tempfile.mkdtemp(prefix="llada-save-"))  # Ray deletes it after the upload
    final = pos.step == steps
    if final:  # every rank iterates (the tensors are gathered one by one); rank 0 writes
        tensors = engine.hf_tensors()
        if rank == 0:
            save_weights(tensors, local)
            tokenizer.save_pretrained(local)
            if engine.dlm.hf.can_generate():
                engine.dlm.hf.generation_config.save_pretrained(local)
        else:
            for _ in tensors:
                pass
    if rank == 0:
        engine.dlm.hf.config.save_pretrained(local)
    engine.save_state(local)
    mine = checkpoint.describe_files(local)
    files = mine
    if dist.is_initialized() and world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        files = {k: v for part in parts for k, v in part.items()}
    val_loss = figures.get("val_loss", float("nan"))
    if rank == 0:
        checkpoint.write_manifest(
            local,
            files,
            {
                "run": unit.name,
                "pipeline": cfg.name,
                "objective": unit.objective,
                "block_size": unit.block_size,
                "step": pos.step,
                "steps": steps,
                "final": final,
                "samples": pos.samples,
                "tokens": pos.tokens,
                "val_loss": val_loss,
                **identity,
                "embed_noise_std": pos.embed_noise_std,
                "resumed_from": pos.resumed_from,
                "started": pos.started,
                "checkpoint_seconds": pos.checkpoint_seconds + (time.perf_counter() - started),
                "created": time.time(),
            },
        )
    if not mine:  # nothing of this rank's to upload
        shutil.rmtree(local)
    ray.train.report(
        {"step": pos.step, "val_loss": val_loss, "tokens": pos.tokens, "keep": keep},
        checkpoint=ray.train.Checkpoint.from_directory(str(local)) if mine else None,
        checkpoint_dir_name=f"{unit.name}/{checkpoint.checkpoint_name(pos.step)}",  # run_dir
        # A run's last checkpoint is in storage before the next run of the group reads it.
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC
        if final
        else ray.train.CheckpointUploadMode.ASYNC,
    )
    if final and dist.is_initialized():
        dist.barrier()  # every rank's part uploaded
    pos.checkpoint_seconds += time.perf_counter() - started
