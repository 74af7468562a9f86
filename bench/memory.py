"""Memory and checkpoint bytes at scale, from the code's own sharding (README "Scale").

Each model is built on the meta device from its architecture (Qwen3-0.6B; LLaDA2.0-mini, the 16B
MoE), wrapped as training wraps it, and sharded by `train.engine.shard` (FSDP2 per decoder
layer, then the root, bf16 MixedPrecisionPolicy) in a fake process group of the configs' world
size: the per-rank sizes are FSDP's own DTensor shards, not arithmetic. From them, per GPU:
fp32 weights, fp32 gradients and AdamW's two fp32 moments (16 B per local parameter), plus what
FSDP gathers in bf16 while it computes (the root, and a layer with the next one prefetched) and
a layer's fp32 gradients before their reduce-scatter. Activations are not counted: they depend
on seq_len, micro-batch and recomputation. Per checkpoint, each rank writes its DCP shard of the
weights (4 B) and of Adam (8 B); at a run's end rank 0 adds the HF export (4 B per parameter),
gathered a tensor at a time into safetensors shards (`model.io.save_weights`): its host holds one
shard of at most 2 GiB plus the tensor being gathered, never the model.

    python bench/memory.py   → bench/results/memory.json and a table
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import AutoModelForCausalLM, Qwen3Config

from llada_ray.config import ScalingConfig
from llada_ray.model import DiffusionLM
from llada_ray.model.llada2 import LLaDA2MoeConfig
from llada_ray.train.engine import shard

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
GPUS_PER_HOST = 8

MODELS = {
    "Qwen3-0.6B (configs/qwen3-0.6b.yaml)": (
        Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=128, tie_word_embeddings=True, mask_token_id=151669),
        8,
    ),
    "LLaDA2.0-mini 16B MoE (configs/llada2-mini-sft.yaml)": (
        LLaDA2MoeConfig(vocab_size=157184, hidden_size=2048, intermediate_size=5120,
                        num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4,
                        head_dim=128, num_experts=256, num_shared_experts=1,
                        num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=512,
                        first_k_dense_replace=1, pad_token_id=156892, mask_token_id=156895),
        16,
    ),
}  # fmt: skip


def _numel(params: list[torch.Tensor]) -> tuple[int, int]:
    """(whole, this rank's) element counts of some FSDP parameters."""
    return sum(p.numel() for p in params), sum(p.to_local().numel() for p in params)


def plan(config: object, world: int) -> dict:
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dlm = DiffusionLM(hf)
    scaling = ScalingConfig(num_workers=world, strategy="fsdp", fsdp_mixed_precision=True)
    shard(dlm, scaling, torch.bfloat16)
    total, local = _numel(list(dlm.parameters()))
    layers = list(hf.base_model.layers)
    layer = max(_numel(list(x.parameters()))[0] for x in layers)
    in_layers = {id(p) for x in layers for p in x.parameters()}
    root = _numel([p for p in dlm.parameters() if id(p) not in in_layers])[0]
    state = 16 * local  # fp32 weights + fp32 gradients + AdamW exp_avg, exp_avg_sq
    gathered = 2 * (root + 2 * layer) + 4 * layer  # bf16 root + 2 layers; a layer's fp32 grads
    shard_bytes = 12 * local  # DCP: fp32 weights (4) + Adam moments (8)
    export = 4 * total
    largest = max(p.numel() for p in dlm.parameters())
    return {
        "gpus": world,
        "parameters": total,
        "parameters_per_rank": local,
        "largest_layer": layer,
        "root_parameters": root,
        "gpu_state_gb": state / GB,
        "gpu_transient_gb": gathered / GB,
        "gpu_total_gb": (state + gathered) / GB,
        "dpo_reference_gb": 4 * local / GB,
        "checkpoint_per_rank_gb": shard_bytes / GB,
        "final_checkpoint_rank0_gb": (shard_bytes + export) / GB,
        "host_rank0_at_export_gb": min(export, (2 << 30) + 4 * largest) / GB,
        "resume_download_per_rank_gb": shard_bytes / GB,
    }


def main() -> None:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    out = {}
    for name, (config, world) in MODELS.items():
        dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        out[name] = plan(config, world)
    dist.destroy_process_group()
    path = ROOT / "bench" / "results" / "memory.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name, r in out.items():
        print(f"\n{name}: {r['parameters'] / 1e9:.2f} B parameters on {r['gpus']} GPUs")
        for key, value in r.items():
            if key.endswith("_gb"):
                print(f"  {key:<32}{value:>10.2f}")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
