"""The one training loop every Ray Train worker runs, for every stage (see train.plan).

A step is a pure function of (weights, optimizer state, seed, run, step, rank): the samples come
from their global index (train.batches) and every random draw from a generator seeded by
(seed, step, rank, micro-batch). So a run restarted from its checkpoint at step s continues
exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llada_ray.config import CptStage, PipelineConfig, TrainingStage
from llada_ray.data.corpus import load_tokenizer
from llada_ray.diffusion.noise import embedding_noise_std
from llada_ray.model import (
    DiffusionLM,
    build_tiny_model,
    embedding_rms,
    ensure_mask_token,
    load_model,
)
from llada_ray.model.io import save_weights
from llada_ray.progress import RunProgress
from llada_ray.storage import storage_root
from llada_ray.train import checkpoint
from llada_ray.train.batches import RowStore, micro_batch_index
from llada_ray.train.engine import Engine, build_engine, load_hf_weights, load_model_shards, place
from llada_ray.train.objectives import Objective, objective_for
from llada_ray.train.plan import Unit, find_unit, learning_rate, total_steps, units

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


def _committed(fs: pafs.FileSystem, path: str, what: str) -> dict:
    manifest = checkpoint.committed(fs, path)
    if manifest is None:
        raise RuntimeError(f"{what} {path} is not a committed checkpoint (a file is missing)")
    return manifest


def _restore(fs: pafs.FileSystem, run_path: str) -> tuple[str, dict] | None:
    """Rank 0 picks the newest committed checkpoint (manifests and file sizes only); every rank
    then loads its part of that one."""
    chosen = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        chosen = [checkpoint.latest(fs, run_path)]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def _build(cfg: PipelineConfig, config: PretrainedConfig, meta: bool) -> PreTrainedModel:
    """A model of `config` on `meta` (no memory) or with random weights: the caller loads the
    real ones."""
    with torch.device("meta") if meta else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(
            config,
            dtype=torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=cfg.model.trust_remote_code,
        )


def _from_config(cfg: PipelineConfig, fs: pafs.FileSystem, path: str, meta: bool) -> DiffusionLM:
    """The architecture of a stored checkpoint, from its config.json alone."""
    fetched = checkpoint.fetch(fs, path, select=lambda rel: rel == "config.json")
    if fetched is None:
        raise RuntimeError(f"checkpoint {path} has no readable config.json")
    try:
        config = AutoConfig.from_pretrained(
            fetched.local, trust_remote_code=cfg.model.trust_remote_code
        )
    finally:
        fetched.cleanup()
    return DiffusionLM(_build(cfg, config, meta), cfg.model.attention, cfg.model.attention_tile)


def _source_dir(cfg: PipelineConfig) -> Path:
    """`model.source` as a local directory (a hub id is downloaded once per node, cached)."""
    local = Path(cfg.model.source).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(cfg.model.source, allow_patterns=["*.json", "*.safetensors"]))


def _from_weights(
    cfg: PipelineConfig, source: str | Path, tokenizer: PreTrainedTokenizerBase
) -> DiffusionLM:
    """A whole model with its weights in this process: the tiny model from its seed, or an HF
    model (the first run from `model.source`, which may still need its mask token row)."""
    if source == "tiny":
        hf = build_tiny_model(cfg.model.tiny, tokenizer, seed=cfg.seed)
    else:
        hf, _ = load_model(
            source,
            mask_token=cfg.model.mask_token,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype="float32",
        )
    return DiffusionLM(hf, cfg.model.attention, cfg.model.attention_tile)


def _load_weights(model: torch.nn.Module, fs: pafs.FileSystem, path: str, manifest: dict) -> None:
    """A checkpoint's weights into a placed (sharded, materialised) model: its DCP shards when
    it has them (a training run's output), else its HF safetensors (the merged model)."""
    if any(rel.startswith(f"{checkpoint.DCP_MODEL}/") for rel in manifest["files"]):
        load_model_shards(model, fs, path, manifest)
        return
    fetched = checkpoint.fetch(fs, path)
    if fetched is None:
        raise RuntimeError(f"checkpoint {path} does not verify")
    try:
        load_hf_weights(model, fetched.local)
    finally:
        fetched.cleanup()


def _start(
    cfg: PipelineConfig,
    unit: Unit,
    fs: pafs.FileSystem,
    restored: tuple[str, dict] | None,
    init: tuple[str, dict] | None,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
) -> tuple[Engine, DiffusionLM | None]:
    """The engine, its weights and optimizer in place, and DPO's frozen reference.

    ddp / fsdp build every model on `meta` from its config, shard it, allocate only this rank's
    part and load that part; DeepSpeed takes a whole model (its ZeRO-3 partitions on init).
    """
    stage = unit.training
    assert stage is not None and unit.lr is not None
    scaling = cfg.scaling
    meta = scaling.strategy != "deepspeed"
    start = restored or init
    source = None  # model.source's weights, when they load shard-wise
    if start is None and cfg.model.source == "tiny":
        dlm = _from_weights(cfg, "tiny", tokenizer)
    elif start is None:
        source = _source_dir(cfg)
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
        if meta and config.vocab_size >= len(tokenizer):  # the mask token has its row already
            hf = _build(cfg, config, meta=True)
            ensure_mask_token(hf, tokenizer, cfg.model.mask_token)
            dlm = DiffusionLM(hf, cfg.model.attention, cfg.model.attention_tile)
        else:  # a row to add for the mask token (or DeepSpeed): the whole model, here
            dlm, source = _from_weights(cfg, source, tokenizer), None
    elif meta or restored or unit.carries_optimizer:
        dlm = _from_config(cfg, fs, start[0], meta)
    else:
        fetched = checkpoint.fetch(fs, init[0])
        if fetched is None:
            raise RuntimeError(f"the checkpoint to start from, {init[0]}, does not verify")
        try:
            dlm = _from_weights(cfg, fetched.local, tokenizer)
        finally:
            fetched.cleanup()
    engine = build_engine(dlm, scaling, stage, unit.lr, cfg.model.dtype, device)
    if restored or (init and unit.carries_optimizer):
        engine.load_state(fs, *start, optimizer=True)
    elif init and meta:
        _load_weights(engine.model, fs, *init)
    elif source is not None:
        load_hf_weights(engine.model, source)

    reference = None
    if unit.objective == "dpo":
        assert init is not None, "dpo always follows a training run"
        reference = _from_config(cfg, fs, init[0], meta)
        reference.requires_grad_(False)
        place(reference, scaling, getattr(torch, cfg.model.dtype), device)  # sharded as the policy
        _load_weights(reference, fs, *init)
        reference.eval()
    return engine, reference


@dataclass
class Worker:
    """What every run of a worker group shares: config, storage, data, place in the group."""

    cfg: PipelineConfig
    payload: dict
    fs: pafs.FileSystem
    tokenizer: PreTrainedTokenizerBase
    store: RowStore
    rank: int
    world: int
    device: torch.device


def train_loop(payload: dict) -> None:
    """The runs `payload["units"]` in order, in this one worker group: one training run, or the
    CPT phases, which hand their engine (weights and optimizer) on in memory. A run that
    already finished is skipped; one that has checkpoints resumes from its newest."""
    cfg = PipelineConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    fs, _ = storage_root(cfg.storage)
    torch.manual_seed(cfg.seed)
    w = Worker(
        cfg,
        payload,
        fs,
        load_tokenizer(fs, payload["tokenizer"]),
        RowStore(fs, payload["data"], cfg.data.validation_fraction),
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.torch.get_device(),  # the CPU here; this worker's GPU with use_gpu
    )
    init = None
    if payload.get("init"):
        init = (payload["init"], _committed(fs, payload["init"], "the checkpoint to start from"))
    engine: Engine | None = None
    for name in payload["units"]:
        unit = find_unit(cfg, name)
        restored = _restore(fs, f"{payload['train_root']}/{unit.run_dir}")
        if restored and restored[1].get("final"):  # done: the next phase starts from it
            engine, init = None, restored
            continue
        reference = None
        if engine is None or restored:
            engine, reference = _start(cfg, unit, fs, restored, init, w.tokenizer, w.device)
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

    store = w.store
    steps = total_steps(unit, cfg, len(store.train_ids), world)
    objective = objective_for(
        unit,
        cfg,
        engine.dlm.mask_token_id,
        w.tokenizer.pad_token_id,
        w.tokenizer.eos_token_id,
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
        "data": w.payload["data_fingerprint"],
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
            progress.update(pos.step, figures["loss"], figures["tokens_per_s"])
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
        checkpoint_dir_name=(f"{unit.name}/" if unit.cpt else "")  # as unit.run_dir
        + checkpoint.checkpoint_name(pos.step),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
    )
    pos.checkpoint_seconds += time.perf_counter() - started
