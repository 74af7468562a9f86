"""The Serve app under load: streaming clients against one replica, and the cost of Serve itself.

The model is the tiny default's export (configs/tiny.yaml through the pipeline, as `make demo`
or bench/decode.py leave it in runs/). One replica (block decoder, τ 0.9, max batch 16) on a
local Ray; 1, 4 and 16 concurrent clients each send streaming chat completions on
verifiable-task prompts back to back for 30 s. Aggregate tokens/s = completion tokens of the
requests finished in the window / window; latency = request start to [DONE]. Serve overhead
compares 16 clients through HTTP with the same engine decoding batches of 16 of the same
prompts in this process.

    python bench/serve.py [--quick]   → bench/results/serve.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import ray
import requests
from ray import serve

from llada_ray.config import ServeConfig, load_config
from llada_ray.data import tasks
from llada_ray.pipeline import manifests
from llada_ray.serve.app import build
from llada_ray.serve.engine import TextEngine
from llada_ray.train.run import pipeline_root

ROOT = Path(__file__).resolve().parent.parent
PORT = 18432
MAX_TOKENS = 32


def model_dir() -> Path:
    cfg = load_config(ROOT / "configs" / "tiny.yaml").anchored(ROOT)
    fs, run_root = pipeline_root(cfg)
    export = manifests.read_all(fs, run_root).get("export")
    if export is None:
        raise SystemExit("no exported model: run `make demo` (or bench/decode.py) first")
    return Path(export["output"])


def client(url: str, prompts: list[str], stop_at: float, out: list[dict]) -> None:
    i = 0
    while time.monotonic() < stop_at:
        body = {
            "model": "tiny",
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
        }
        started, tokens, ok = time.monotonic(), 0, False
        try:
            with requests.post(url, json=body, stream=True, timeout=120) as r:
                for line in r.iter_lines(decode_unicode=True):
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
                    ok = line == "data: [DONE]" or ok
                ok = ok and r.status_code == 200
        except requests.RequestException:
            ok = False
        out.append(
            {
                "end": time.monotonic(),
                "latency": time.monotonic() - started,
                "tokens": tokens,
                "ok": ok,
            }
        )
        i += 1


def load(url: str, prompts: list[str], clients: int, seconds: float) -> dict:
    start = time.monotonic()
    stop_at = start + seconds
    records: list[dict] = []
    threads = [
        threading.Thread(
            target=client, args=(url, prompts[c::clients] or prompts, stop_at, records)
        )
        for c in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window = [r for r in records if r["end"] <= stop_at and r["ok"]]
    latencies = sorted(r["latency"] for r in window)
    # Over the span the finished requests cover: requests cut off by the window's end would
    # otherwise count in the time but not in the tokens.
    span = max((r["end"] for r in window), default=stop_at) - start
    return {
        "clients": clients,
        "requests": len(window),
        "errors": sum(not r["ok"] for r in records),
        "tokens_per_s": sum(r["tokens"] for r in window) / span,
        "p50_latency_s": statistics.median(latencies) if latencies else float("nan"),
        "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else float("nan"),
    }


def direct(cfg: ServeConfig, prompts: list[str], batch: int, seconds: float) -> float:
    """Tokens/s of the same engine in this process, batches of `batch`, for `seconds`."""
    engine = TextEngine.load(cfg)
    jobs = [
        engine.job(
            engine.encode_chat([{"role": "user", "content": p}]),
            max_tokens=MAX_TOKENS,
            temperature=None,
            top_p=None,
            top_k=None,
            threshold=None,
            min_accept=None,
            seed=None,
            stop=(),
        )
        for p in prompts
    ]
    tokens, started, i = 0, time.monotonic(), 0
    while time.monotonic() - started < seconds:
        chunk = [jobs[(i + k) % len(jobs)] for k in range(batch)]
        last = [None] * batch
        for step in engine.run(chunk):
            last = [u or prev for u, prev in zip(step, last, strict=True)]
        tokens += sum(u.completion_tokens for u in last)
        i += batch
    return tokens / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s per level instead of 30")
    args = parser.parse_args()
    seconds = 10.0 if args.quick else 30.0
    prompts = [ex.prompt for ex in tasks.examples(99, 0, 64)]
    settings = {
        "model": str(model_dir()),
        "model_name": "tiny",
        "threshold": 0.9,
        "max_batch_size": 16,
        "max_ongoing_requests": 32,
        "num_cpus": 1,
        "torch_threads": os.cpu_count(),
        "port": PORT,
    }
    cfg = ServeConfig.model_validate(settings)

    levels = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build(settings), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
        load(url, prompts, 4, 3.0)  # warm-up
        for clients in (1, 4, 16):
            levels.append(load(url, prompts, clients, seconds))
            print(levels[-1], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    direct_rate = direct(cfg, prompts, 16, seconds)

    by = {lvl["clients"]: lvl for lvl in levels}
    scaling = by[16]["tokens_per_s"] / by[1]["tokens_per_s"]
    overhead = 1 - by[16]["tokens_per_s"] / direct_rate
    report = {
        "setup": {
            "model": "tiny export (configs/tiny.yaml)",
            "replicas": 1,
            "max_batch_size": 16,
            "threshold": 0.9,
            "max_tokens": MAX_TOKENS,
            "seconds_per_level": seconds,
            "cpus": os.cpu_count(),
        },
        "levels": levels,
        "direct_tokens_per_s_batch16": direct_rate,
        "targets": {
            "batching_16_vs_1_clients": {
                "value": scaling,
                "goal": 3.0,
                "higher_is_better": True,
                "met": scaling >= 3.0,
            },
            "serve_overhead_vs_direct": {
                "value": overhead,
                "goal": 0.10,
                "higher_is_better": False,
                "met": overhead <= 0.10,
            },
            "errors": {
                "value": sum(lvl["errors"] for lvl in levels),
                "goal": 0,
                "higher_is_better": False,
                "met": all(lvl["errors"] == 0 for lvl in levels),
            },
        },
    }
    out = ROOT / "bench" / "results" / "serve.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'clients':>8}{'requests':>10}{'errors':>8}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}")
    for lvl in levels:
        print(
            f"{lvl['clients']:>8}{lvl['requests']:>10}{lvl['errors']:>8}"
            f"{lvl['tokens_per_s']:>10.1f}{lvl['p50_latency_s']:>8.3f}{lvl['p99_latency_s']:>8.3f}"
        )
    print(f"direct engine, batch 16: {direct_rate:.1f} tokens/s")
    for name, t in report["targets"].items():
        print(f"{name}: {t['value']:.3f} (goal {t['goal']}) met {t['met']}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
