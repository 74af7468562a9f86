"""A run's starting state on a worker: which checkpoint it resumes, and the model it trains.

ddp / fsdp build every model on the `meta` device from its config, shard it, allocate only
this rank's part and load that part (DCP shards, or HF safetensors slice by slice); DeepSpeed
takes a whole model. Only the first run from an HF `model.source` whose embeddings lack a row
for the mask token loads the whole model in each process (the row is added by resizing).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llada_ray.config import PipelineConfig
from llada_ray.model import DiffusionLM, build_tiny_model, ensure_mask_token, load_model
from llada_ray.train import checkpoint
from llada_ray.train.engine import (
    Engine,
    build_engine,
    load_hf_weights,
    load_model_shards,
    place,
)
from llada_ray.train.plan import Unit


def restore(fs: pafs.FileSystem, run_path: str) -> tuple[str, dict] | None:
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
    if checkpoint.has_dcp_model(manifest):
        load_model_shards(model, fs, path, manifest)
        return
    fetched = checkpoint.fetch(fs, path)
    if fetched is None:
        raise RuntimeError(f"checkpoint {path} does not verify")
    try:
        load_hf_weights(model, fetched.local)
    finally:
        fetched.cleanup()


def start(
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
