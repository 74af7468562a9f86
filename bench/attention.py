"""Attention for block-diffusion training on CPU: unfused vs dense-mask SDPA vs block-sparse SDPA.

One BD training step (forward + backward) of the tiny default model at L = 2048 (input [xt ; x0],
2L = 4096 tokens), block 32, one document per row (no document sparsity to exploit: the hard
case). Reports, per attention path:
  - attention time: one layer's attention forward + backward on tensors of the model's shapes;
  - peak attention memory: the rise of the process's peak RSS during that forward + backward;
  - whole-step time: the model's forward + backward, everything included (mask/plan building);
and the stable phase (xt alone, block = L) against BD mode in training tokens/s.

    python bench/attention.py [--quick]     → bench/results/attention.json and a table
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llada_ray.config import TinyModelConfig, load_config
from llada_ray.diffusion.losses import elbo_loss
from llada_ray.diffusion.masks import block_diffusion_layout, position_ids_for
from llada_ray.diffusion.noise import forward_mask, sample_mask_rates
from llada_ray.model import DiffusionLM, build_tiny_model, train_tokenizer
from llada_ray.model.adapter import block_diffusion_inputs, stable_inputs
from llada_ray.model.attention import MaskedAttention

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN, BLOCK = 2048, 32
PATHS = {"unfused": "eager", "dense_sdpa": "dense", "block_sparse": "block_sparse"}


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_rise_mb(fn: Callable[[], object]) -> float:
    """How far the process's peak RSS rises above its current RSS while fn runs (Linux)."""

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])  # kB
        raise KeyError(field)

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 1024


def pin_malloc() -> None:
    # glibc raises its mmap threshold after big frees, after which freed attention buffers stay in
    # the heap and hide later peaks. A fixed threshold keeps every large buffer an mmap, so RSS
    # tracks what is really live.
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    pin_malloc()
    torch.manual_seed(0)

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    tiny: TinyModelConfig = cfg.model.tiny
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = train_tokenizer(
        (p.read_text() for p in sorted(stdlib.glob("*.py"))[:30]), cfg.tokenizer.vocab_size
    )
    model = DiffusionLM(build_tiny_model(tiny, tokenizer), tile_size=cfg.model.attention_tile)

    x0 = torch.randint(5, len(tokenizer), (1, SEQ_LEN))
    docs = torch.zeros_like(x0)
    positions = position_ids_for(docs, True)
    t = sample_mask_rates(1)
    noised = forward_mask(x0, t, torch.ones_like(x0, dtype=torch.bool), model.mask_token_id)

    # --- attention alone, one layer's shapes -------------------------------------------------
    layout = block_diffusion_layout(docs, BLOCK)
    head_dim = tiny.hidden_size // tiny.num_heads
    n = 2 * SEQ_LEN
    q = torch.randn(1, tiny.num_heads, n, head_dim, requires_grad=True)
    k = torch.randn(1, tiny.num_kv_heads, n, head_dim, requires_grad=True)
    v = torch.randn(1, tiny.num_kv_heads, n, head_dim, requires_grad=True)

    results: dict[str, dict[str, float]] = {}
    for name, backend in PATHS.items():
        attention = MaskedAttention(layout, backend, cfg.model.attention_tile)

        def attention_step(attention: MaskedAttention = attention) -> None:
            attention(q, k, v, None).sum().backward()

        def bd_step(backend: str = backend) -> None:
            model.attention = backend
            inputs = block_diffusion_inputs(noised.xt, x0, docs, positions, BLOCK)
            elbo_loss(model(**inputs), x0, noised.masked, t).loss.backward()

        results[name] = {
            "attention_s": timed(attention_step, repeats),
            "attention_peak_mb": peak_rss_rise_mb(attention_step),
            "step_s": timed(bd_step, repeats),
        }
        print(f"measured {name}", file=sys.stderr)

    def stable_step() -> None:
        model.attention = "block_sparse"
        inputs = stable_inputs(noised.xt, docs, positions)
        elbo_loss(model(**inputs), x0, noised.masked, t).loss.backward()

    stable_s = timed(stable_step, repeats)
    bd_s = results["block_sparse"]["step_s"]
    plan = layout.tiled(cfg.model.attention_tile)

    sparse, unfused, dense = results["block_sparse"], results["unfused"], results["dense_sdpa"]
    step_speedup = unfused["step_s"] / sparse["step_s"]
    memory_saving = 1 - sparse["attention_peak_mb"] / unfused["attention_peak_mb"]
    attention_speedup = dense["attention_s"] / sparse["attention_s"]
    stable_speedup = bd_s / stable_s
    report = {
        "setup": {
            "seq_len": SEQ_LEN,
            "input_tokens_bd": 2 * SEQ_LEN,
            "block_size": BLOCK,
            "tile": cfg.model.attention_tile,
            "plan_density": plan.density(),
            "model": tiny.model_dump(),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "torch": torch.__version__,
        },
        "paths": results,
        "stable": {"step_s": stable_s, "tokens_per_s": SEQ_LEN / stable_s},
        "bd": {"step_s": bd_s, "tokens_per_s": SEQ_LEN / bd_s},
        "targets": {
            "block_sparse_vs_unfused_step_speedup": target(step_speedup, 1.5),
            "block_sparse_vs_unfused_attention_memory_saving": target(memory_saving, 0.90),
            "block_sparse_vs_dense_sdpa_attention_speedup": target(attention_speedup, 2.0),
            "stable_vs_bd_tokens_per_s": target(stable_speedup, 1.8),
        },
    }
    out = ROOT / "bench" / "results" / "attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nBD training step, L={SEQ_LEN} (input {2 * SEQ_LEN}), block {BLOCK}, tiny model")
    print(f"{'path':<14}{'attn fwd+bwd s':>16}{'attn peak MB':>14}{'step s':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['attention_s']:>16.3f}{r['attention_peak_mb']:>14.0f}{r['step_s']:>10.3f}")
    print(f"stable phase step {stable_s:.3f}s vs BD {bd_s:.3f}s\n")
    print(f"{'target':<52}{'value':>8}{'goal':>8}  met")
    for name, tgt in report["targets"].items():
        print(f"{name:<52}{tgt['value']:>8.2f}{tgt['goal']:>8.2f}  {tgt['met']}")
    print(f"\nwrote {out.relative_to(ROOT)}")


def target(value: float, goal: float) -> dict:
    return {"value": round(value, 3), "goal": goal, "higher_is_better": True, "met": value >= goal}


if __name__ == "__main__":
    main()
