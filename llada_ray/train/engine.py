"""Strategies: how a DiffusionLM is wrapped, stepped and checkpointed on the workers.

  ddp        DistributedDataParallel via Ray Train's `prepare_model` (gloo on CPU, NCCL on GPU)
  fsdp       FSDP2 `fully_shard` per decoder layer, then the root (torchtitan's layout)
  deepspeed  a DeepSpeed engine with ZeRO stage 0-3, optional CPU optimizer offload

All three expose one interface to the loop. Weights are kept in fp32; `model.dtype` bfloat16 /
float16 is the compute precision (autocast for ddp / fsdp, DeepSpeed's own bf16 / fp16 mode with
fp32 master weights), so small updates are never rounded away. The learning rate is set by the
loop every step (a pure function of the step, see plan.learning_rate): no scheduler state.
Weights are checkpointed as a full HF state dict gathered to rank 0; optimizer state as a full,
wrapper-free state dict (ddp / fsdp, so a run can resume under the other) or DeepSpeed's own
per-rank shards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from llada_ray.config import ScalingConfig, TrainingStage
from llada_ray.model.adapter import DiffusionLM

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


class TorchEngine:
    """ddp / fsdp (or a single process): torch.optim.AdamW and torch.distributed state dicts."""

    OPTIMIZER = "optimizer.pt"

    def __init__(
        self, dlm: DiffusionLM, scaling: ScalingConfig, stage: TrainingStage, dtype: str
    ) -> None:
        self.dlm, self.stage, self.dtype = dlm, stage, getattr(torch, dtype)
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed and dist.get_world_size() > 1:
            if scaling.strategy == "fsdp":
                from torch.distributed.fsdp import fully_shard

                layers = getattr(dlm.hf.base_model, "layers", None)
                if layers is None:
                    raise ValueError(
                        f"strategy fsdp shards per decoder layer, and {type(dlm.hf).__name__} "
                        "has no base_model.layers: use ddp or deepspeed"
                    )
                for layer in layers:
                    fully_shard(layer)
                fully_shard(dlm)
                self.model: torch.nn.Module = dlm
            else:
                import ray.train.torch

                self.model = ray.train.torch.prepare_model(dlm)
        else:
            self.model = dlm
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

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights in HF names on rank 0 (a collective under FSDP); None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.distributed:
            return _hf_names(self.dlm.state_dict())
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return _hf_names(state) if dist.get_rank() == 0 else None

    def save_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        if not self.distributed:
            torch.save(self.optimizer.state_dict(), directory / self.OPTIMIZER)
            return
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if dist.get_rank() == 0:
            torch.save(state, directory / self.OPTIMIZER)

    def load_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        state = torch.load(directory / self.OPTIMIZER, weights_only=True)
        if not self.distributed:
            self.optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(
            self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True)
        )


class DeepSpeedEngine:
    """DeepSpeed ZeRO; runs on CPU with gloo inside Ray Train workers (ENVIRONMENT.md)."""

    TAG = "deepspeed"

    def __init__(
        self, dlm: DiffusionLM, scaling: ScalingConfig, stage: TrainingStage, lr: float, dtype: str
    ) -> None:
        import deepspeed

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

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective
        else:
            state = self.engine.module.state_dict()
        return _hf_names(state) if dist.get_rank() == 0 else None

    def save_state(self, directory: Path) -> None:
        # Every rank writes its own optimizer shard; file names carry the rank, so Ray Train
        # merges them into one checkpoint directory.
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory), tag=self.TAG)


Engine = TorchEngine | DeepSpeedEngine


def build_engine(
    dlm: DiffusionLM, scaling: ScalingConfig, stage: TrainingStage, lr: float, dtype: str
) -> Engine:
    if scaling.strategy == "deepspeed":
        return DeepSpeedEngine(dlm, scaling, stage, lr, dtype)
    return TorchEngine(dlm, scaling, stage, dtype)
