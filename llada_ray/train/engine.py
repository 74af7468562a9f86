"""Strategies: how a DiffusionLM is wrapped, stepped and checkpointed on the workers.

  ddp        DistributedDataParallel via Ray Train's `prepare_model` (gloo on CPU, NCCL on GPU)
  fsdp       FSDP2 `fully_shard` per decoder layer, then the root (torchtitan's layout), with an
             optional MixedPrecisionPolicy (`scaling.fsdp_mixed_precision`)
  deepspeed  a DeepSpeed engine with ZeRO stage 0-3, optional CPU optimizer offload

All three expose one interface to the loop. Master weights are fp32; `model.dtype` bfloat16 /
float16 is the compute precision (autocast or FSDP's param dtype for ddp / fsdp, DeepSpeed's own
bf16 / fp16 mode), so small updates are never rounded away. The learning rate is set by the loop
every step (a pure function of the step, see plan.learning_rate): no scheduler state.

A model may arrive on the `meta` device (built from its config alone): ddp / fsdp then shard it
first and allocate only this rank's part (`to_empty`), and the weights are loaded shard-wise,
from a DCP checkpoint or from HF safetensors. Trainer state is saved with DCP (train.shards),
each rank its own shard, and loads under any world size; DeepSpeed keeps its native per-rank
ZeRO files. Full HF weights are gathered only for a run's final export, a tensor at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from llada_ray.config import ScalingConfig, TrainingStage
from llada_ray.model.adapter import DiffusionLM
from llada_ray.train import shards
from llada_ray.train.checkpoint import DCP_MODEL, DCP_OPTIM, fetch

BETAS = (0.9, 0.95)
HF_PREFIX = "hf."  # DiffusionLM keeps the Hugging Face model as `self.hf`


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases (1-D) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(HF_PREFIX): v for k, v in state.items()}


def _tied_aliases(hf: torch.nn.Module) -> set[str]:
    """Names of parameters that repeat an earlier one (a head tied to the embeddings): HF
    stores a tied weight once."""
    seen: set[int] = set()
    aliases = set()
    for name, param in hf.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Allocate a meta-built (and possibly sharded) module on `device`, weights uninitialised.

    `to_empty` gives a meta parameter a new Parameter per owner, so tied weights (a head tied to
    the embeddings) are tied again. Non-persistent buffers are not in any checkpoint, so they
    are computed again: the modules that hold them (rotary embeddings) are built from their
    config alone, and theirs copied.
    """
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((sub, name))
    module.to_empty(device=device)
    for (first, first_name), *others in owners.values():
        for sub, name in others:
            setattr(sub, name, getattr(first, first_name))
    for name, sub in module.named_modules():
        own = [b for b in sub._non_persistent_buffers_set if getattr(sub, b, None) is not None]
        if not own:
            continue
        if not hasattr(sub, "config"):
            raise ValueError(
                f"{name} ({type(sub).__name__}) has non-persistent buffers {own} that a meta "
                "build cannot recompute: it needs a `config` to be rebuilt from"
            )
        fresh = type(sub)(sub.config)
        for b in own:
            getattr(sub, b).copy_(getattr(fresh, b))


def shard(dlm: DiffusionLM, scaling: ScalingConfig, compute_dtype: torch.dtype) -> None:
    """FSDP2 in place: each decoder layer, then the root; a no-op in one process."""
    if not (_distributed() and scaling.strategy == "fsdp"):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(dlm.hf.base_model, "layers", None)
    if layers is None:
        raise ValueError(
            f"strategy fsdp shards per decoder layer, and {type(dlm.hf).__name__} has no "
            "base_model.layers: use ddp or deepspeed"
        )
    policy = MixedPrecisionPolicy()
    if scaling.fsdp_mixed_precision:  # low-precision weights in compute, fp32 gradient reduce
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(dlm, mp_policy=policy)


def place(
    dlm: DiffusionLM, scaling: ScalingConfig, compute_dtype: torch.dtype, device: torch.device
) -> None:
    """Shard (fsdp), then allocate this rank's part on `device`: a meta-built model is
    materialised only after sharding, so no rank ever holds the whole of it."""
    shard(dlm, scaling, compute_dtype)
    if on_meta(dlm):
        materialize(dlm, device)
    else:
        dlm.to(device)


def load_hf_weights(model: torch.nn.Module, directory: Path) -> None:
    """Weights from an HF safetensors directory, each rank reading only its own slices (DCP's
    HuggingFaceStorageReader over memory-mapped files). A tied weight is stored once."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = get_model_state_dict(model)
    named = _hf_names(state)
    reader = HuggingFaceStorageReader(str(directory))
    stored = set(shards.stored_tensors(reader))

    def storage(t: torch.Tensor) -> int:
        return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()

    loaded = {storage(v) for k, v in named.items() if k in stored}
    if missing := sorted(
        k for k, v in named.items() if k not in stored and storage(v) not in loaded
    ):
        raise ValueError(f"{directory} lacks weights {missing[:5]}")
    shards.load({k: v for k, v in named.items() if k in stored}, reader, partial=True)
    set_model_state_dict(model, state)


def load_model_shards(
    model: torch.nn.Module, fs: pafs.FileSystem, path: str, manifest: dict
) -> None:
    """A stored checkpoint's weights from its DCP shards into a placed model (sharded or not)."""
    state = get_model_state_dict(model)
    reader = shards.ShardReader(fs, path, manifest, DCP_MODEL)
    try:
        shards.load(state, reader)
    finally:
        reader.cleanup()
    set_model_state_dict(model, state)


class TorchEngine:
    """ddp / fsdp (or a single process): torch.optim.AdamW, trainer state in DCP shards."""

    def __init__(
        self,
        dlm: DiffusionLM,
        scaling: ScalingConfig,
        stage: TrainingStage,
        dtype: str,
        device: torch.device,
    ) -> None:
        self.dlm, self.stage, self.dtype = dlm, stage, getattr(torch, dtype)
        place(dlm, scaling, self.dtype, device)
        self.model: torch.nn.Module = dlm
        if _distributed() and scaling.strategy == "ddp":
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(dlm)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, stage.weight_decay), lr=0.0, betas=BETAS
        )
        self.accumulation = stage.grad_accumulation

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(next(self.dlm.parameters()).device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def finish_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.stage.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole weights in HF names, one tensor at a time, each tied weight once: gathered
        tensor by tensor (a collective under FSDP: every rank iterates), so rank 0's host holds
        one tensor, never the model. Only rank 0 gets them."""
        state = get_model_state_dict(self.model)  # this rank's shards: nothing gathered yet
        aliases = _tied_aliases(self.dlm.hf)
        rank0 = not _distributed() or dist.get_rank() == 0
        for name, tensor in _hf_names(state).items():
            if name in aliases:
                continue
            whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if rank0:
                yield name, whole.detach().cpu()

    def save_state(self, directory: Path) -> None:
        """Collective: this rank's shards of the weights and the optimizer."""
        model, optim = get_state_dict(self.model, self.optimizer)
        shards.save(model, directory / DCP_MODEL)
        shards.save(optim, directory / DCP_OPTIM)

    def load_state(
        self, fs: pafs.FileSystem, path: str, manifest: dict, optimizer: bool = True
    ) -> None:
        """Weights (and the optimizer) from the stored checkpoint's DCP shards, written under
        any world size; this rank fetches only the shard files its part needs."""
        if not optimizer:
            load_model_shards(self.model, fs, path, manifest)
            return
        model, optim = get_state_dict(self.model, self.optimizer)
        for state, part in ((model, DCP_MODEL), (optim, DCP_OPTIM)):
            reader = shards.ShardReader(fs, path, manifest, part)
            try:
                shards.load(state, reader)
            finally:
                reader.cleanup()
        set_state_dict(self.model, self.optimizer, model_state_dict=model, optim_state_dict=optim)


class DeepSpeedEngine:
    """DeepSpeed ZeRO; runs on CPU with gloo inside Ray Train workers (ENVIRONMENT.md)."""

    TAG = "deepspeed"

    def __init__(
        self,
        dlm: DiffusionLM,
        scaling: ScalingConfig,
        stage: TrainingStage,
        lr: float,
        dtype: str,
        device: torch.device,
    ) -> None:
        import deepspeed

        dlm.to(device)

        zero: dict = {"stage": scaling.zero_stage}
        if scaling.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if scaling.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        config = {
            "train_micro_batch_size_per_gpu": stage.micro_batch_size,
            "gradient_accumulation_steps": stage.grad_accumulation,
            "gradient_clipping": stage.grad_clip,
            "zero_optimization": zero,
            "optimizer": {
                "type": "AdamW",
                # torch's AdamW unless offloaded (then DeepSpeed's CPUAdam): FusedAdam is CUDA-only.
                "params": {
                    "lr": lr,
                    "betas": list(BETAS),
                    "torch_adam": not scaling.offload_optimizer,
                },
            },
            "steps_per_print": 1 << 30,
        }
        if dtype == "bfloat16":
            config["bf16"] = {"enabled": True}
        elif dtype == "float16":
            config["fp16"] = {"enabled": True}
        self.dlm, self.zero_stage = dlm, scaling.zero_stage
        self.engine, _, _, _ = deepspeed.initialize(
            model=dlm, model_parameters=_param_groups(dlm, stage.weight_decay), config=config
        )
        self.model = self.engine

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine casts itself

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales by 1/accumulation and steps the optimizer on the boundary micro-batch.
        self.engine.backward(loss)
        self.engine.step()

    def finish_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole weights in HF names on rank 0 (ZeRO-3 consolidates them there: a collective,
        in 16-bit)."""
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective
        else:
            state = self.engine.module.state_dict()
        if dist.get_rank() == 0:
            aliases = _tied_aliases(self.dlm.hf)
            yield from ((k, v) for k, v in _hf_names(state).items() if k not in aliases)

    def save_state(self, directory: Path) -> None:
        # Every rank writes its own ZeRO shard; file names carry the rank, so Ray Train merges
        # them into one checkpoint directory. No weights are consolidated here.
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load_state(
        self, fs: pafs.FileSystem, path: str, manifest: dict, optimizer: bool = True
    ) -> None:
        """DeepSpeed's own files (written under the same world size: the driver checks)."""
        fetched = fetch(fs, path, select=lambda rel: rel.startswith(f"{self.TAG}/"))
        if fetched is None:
            raise RuntimeError(f"checkpoint {path} does not verify")
        try:
            self.engine.load_checkpoint(
                str(fetched.local), tag=self.TAG, load_optimizer_states=optimizer
            )
        finally:
            fetched.cleanup()


Engine = TorchEngine | DeepSpeedEngine


def build_engine(
    dlm: DiffusionLM,
    scaling: ScalingConfig,
    stage: TrainingStage,
    lr: float,
    dtype: str,
    device: torch.device,
) -> Engine:
    if scaling.strategy == "deepspeed":
        return DeepSpeedEngine(dlm, scaling, stage, lr, dtype, device)
    return TorchEngine(dlm, scaling, stage, dtype, device)
