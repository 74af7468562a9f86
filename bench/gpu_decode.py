"""The decode engine on an accelerator: what one forward costs, AR against block diffusion.

A random-weight model of Qwen3-0.6B's shape in bf16 (on CPU, `--device cpu`: a small shape in
fp32, so the code paths stay exercised where there is no GPU), decoded through the project's
own decoders on the static-shape engine: AR, and block diffusion forced to accept exactly k
tokens per forward (τ 1.0, min_accept k; "bd k4") at block 32; batch 1 and 16; the engine
compiled (`compile: auto`, the default, on CUDA; `on` on CPU) and eager (`off`); and HF
`generate()` on the same weights (sdpa) as the library's reference. No EOS can end a request
early (the decoders' EOS id is one no token has), so every row decodes its whole budget.

Recompilations are counted after the warm-up (`torch._dynamo.utils.counters`), over the whole run.

    python bench/gpu_decode.py [--device cpu] [--quick]   → bench/results/gpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, Qwen3Config

from llada_ray.decoding import ARDecoder, BlockDecoder, Decoder, EngineOptions, Sampling
from llada_ray.model import DiffusionLM

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32
NO_EOS = -1  # no token has this id: requests run to their budget
SHAPES = {  # Qwen3-0.6B's architecture; a small one for CPU runs
    "cuda": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "vocab_size": 151936},
    "cpu": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "vocab_size": 4096},
}  # fmt: skip


def build(device: str, dtype: torch.dtype) -> torch.nn.Module:
    config = Qwen3Config(
        **SHAPES[device], max_position_embeddings=4096, tie_word_embeddings=True, mask_token_id=1
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def timed(decoder: Decoder, prompts: list[list[int]], sampling: Sampling, repeats: int) -> dict:
    """The fastest of `repeats` decodes (after one untimed)."""
    decoder.generate(prompts, sampling)
    best = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = decoder.generate(prompts, sampling)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    tokens = sum(len(g.tokens) for g in out)
    forwards = max(g.forwards for g in out)  # the batch's forwards
    return {"seconds": best, "tokens": tokens, "forwards": forwards,
            "ms_per_forward": 1000 * best / forwards, "tokens_per_s": tokens / best}  # fmt: skip


def hf_generate(model: torch.nn.Module, prompt: list[int], new: int, repeats: int) -> dict:
    ids = torch.tensor([prompt], device=model.device)
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
    model.generate(ids, **kwargs)
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    return {"seconds": best, "tokens": new, "forwards": new,
            "ms_per_forward": 1000 * best / new, "tokens_per_s": new / best}  # fmt: skip


def target(value: float | None, goal: float, note: str, higher: bool = False) -> dict:
    met = None if value is None else (value >= goal if higher else value <= goal)
    return {"value": value, "goal": goal, "higher_is_better": higher, "met": met, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="shorter prompts and answers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_decode.json")
    args = parser.parse_args()
    device = args.device
    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    prompt_len, new = (64, 64) if args.quick or not gpu else (256, 256)
    repeats = 3 if gpu else 1
    batches = (1, 16)
    ks = (1, 4, 32)
    max_length = -(-(prompt_len + new) // BLOCK) * BLOCK

    hf = build(device, dtype)
    dlm = DiffusionLM(build(device, dtype))  # its own copy: DiffusionLM sets our attention
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPES[device]["vocab_size"]
    prompts = [torch.randint(5, vocab, (prompt_len,), generator=gen).tolist() for _ in range(16)]

    rows: list[dict] = []
    warm_up_s: dict[str, float] = {}
    graphs_after_warm_up: dict[str, int] = {}
    # The default (auto) compiles on CUDA; on CPU it is eager, so a CPU run compiles with "on".
    modes = ("auto" if gpu else "on", "off")
    for compile in modes:
        options = EngineOptions(max(batches), 256, compile)
        ar = ARDecoder(dlm, NO_EOS, max_length=max_length, engine=options)
        bd = BlockDecoder(dlm, NO_EOS, BLOCK, max_length=max_length, engine=options)
        started = time.perf_counter()
        for decoder in (ar, bd):
            decoder.warm_up(list(batches))
        warm_up_s[compile] = time.perf_counter() - started
        graphs = counters["stats"]["unique_graphs"]
        for batch in batches:
            cases = [("ar", ar, Sampling(max_new_tokens=new))] + [
                (f"bd k{k}", bd, Sampling(1.0, min_accept=k, max_new_tokens=new)) for k in ks
            ]
            for name, decoder, sampling in cases:
                result = timed(decoder, prompts[:batch], sampling, repeats)
                rows.append({"compile": compile, "batch": batch, "decoder": name} | result)
                ms, rate = result["ms_per_forward"], result["tokens_per_s"]
                print(f"{compile:<5} batch {batch:>2} {name:<7} {ms:8.2f} ms/forward "
                      f"{rate:10.1f} tokens/s", flush=True)  # fmt: skip
        graphs_after_warm_up[compile] = counters["stats"]["unique_graphs"] - graphs
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    reference = hf_generate(hf, prompts[0], new, repeats)
    rows.append({"compile": "hf generate()", "batch": 1, "decoder": "ar"} | reference)
    print(f"HF generate() batch 1: {reference['ms_per_forward']:.2f} ms/token")

    def find(compile: str, batch: int, decoder: str) -> dict:
        return next(
            r for r in rows if (r["compile"], r["batch"], r["decoder"]) == (compile, batch, decoder)
        )

    on_gpu = "" if gpu else "a GPU target: this run is on CPU (small shape), the value is not it"
    default = modes[0]
    recompiles = sum(graphs_after_warm_up.values())
    targets = {
        "bd_block_forward_ms_batch1": target(
            find(default, 1, "bd k4")["ms_per_forward"] if gpu else None, 8.0, on_gpu or "bd k4"
        ),
        "ar_token_forward_ms_batch1": target(
            find(default, 1, "ar")["ms_per_forward"] if gpu else None, 8.0, on_gpu or "ar"
        ),
        "bd_k4_tokens_per_s_batch16": target(
            find(default, 16, "bd k4")["tokens_per_s"] if gpu else None,
            8000.0,
            on_gpu or "bd k4",
            higher=True,
        ),
        "recompilations_after_warm_up": target(
            recompiles, 0, f"graphs compiled after warm-up, whole run: {graphs_after_warm_up}"
        ),
    }
    report = {
        "setup": {
            "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
            "shape": SHAPES[device],
            "dtype": str(dtype),
            "prompt_tokens": prompt_len,
            "new_tokens": new,
            "block_size": BLOCK,
            "batches": list(batches),
            "torch": torch.__version__,
            "warm_up_s": warm_up_s,
        },
        "results": rows,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, t in targets.items():
        print(f"{name}: {t['value']} (goal {t['goal']}) met {t['met']}  {t['note']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
