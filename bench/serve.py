"""The Serve app under load, against the engine alone: continuous batching, the prefix cache,
and what Serve itself costs.

The model is the tiny default's export (configs/tiny.yaml through the pipeline, as `make demo`
leaves it in runs/). One replica per app (block decoder, τ 0.9, max batch 16, one CPU and one
torch thread: on 2 cores shared with the proxy and the clients, a second thread is slower) on a
local Ray. The load comes from a separate process (`--client`): asyncio + aiohttp, keep-alive
connections, streaming chat completions of verifiable-task prompts, each `max_tokens` 128 with
`ignore_eos` (answers long enough that decoding dominates).
  - closed loop: N clients sending back to back, N ∈ {1, 4, 16, 32}, and 16 not streamed;
  - open loop: Poisson arrivals at half the 16-client request rate;
  - a 512-token system prompt shared by every request, to an app with the prefix cache and to
    one without: time to first block, at 1 client (the prefill's own cost) and at 16;
  - engine alone: the 1- and 16-client closed loops fed to the same decode loop in this
    process, with no HTTP and no Serve (Ray is shut down first).
Tokens/s = completion tokens of the requests finished in the window / the span they cover;
latency = send to [DONE]; time to first block = send to the first content chunk (client) and
arrival in the decode loop to its first update (server); batch sizes are the replica's own
count (`/stats`) over the level; CPU shares are from /proc (1.0: every core all the time).

    python bench/serve.py [--seconds 20]  → bench/results/serve.json and a table
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 18432
MAX_TOKENS = 128
SYSTEM = ("You answer verifiable tasks: add numbers, reverse, sort or upper-case words. " * 8)[:512]


def model_dir() -> Path:
    from llada_ray.config import load_config
    from llada_ray.pipeline import manifests
    from llada_ray.train.outputs import pipeline_root

    cfg = load_config(ROOT / "configs" / "tiny.yaml").anchored(ROOT)
    fs, run_root = pipeline_root(cfg)
    export = manifests.read_all(fs, run_root).get("export")
    if export is None:
        raise SystemExit("no exported model: run `make demo` (or bench/decode.py) first")
    return Path(export["output"])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _body(question: str, system: bool) -> dict:
    messages = [{"role": "user", "content": question}]
    if system:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


# --- the load generator: its own process ------------------------------------------------------


async def _request(session, url: str, body: dict) -> dict:
    started, first, tokens, forwards, ok = time.monotonic(), None, 0, 0, False
    try:
        async with session.post(url, json=body) as r:
            if not body["stream"]:  # one JSON answer: its first block is its end
                answer = await r.json()
                ok = r.status == 200
                tokens = answer["usage"]["completion_tokens"]
                forwards = answer["decoding"]["forwards"]
            else:
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        ok = r.status == 200
                    elif line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:  # a stream that fails still ends with [DONE]
                            raise RuntimeError(chunk["error"]["message"])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                            forwards = chunk["decoding"]["forwards"]
                        delta = (chunk.get("choices") or [{}])[0].get("delta", {})
                        if first is None and "content" in delta and "role" not in delta:
                            first = time.monotonic()
    except Exception:  # counted as an error
        ok = False
    end = time.monotonic()
    return {"sent": started, "end": end, "first": (first or end) - started, "tokens": tokens,
            "forwards": forwards, "ok": ok}  # fmt: skip


async def _load(spec: dict) -> list[dict]:
    import aiohttp

    bodies = [_body(q, spec["system"]) | {"stream": spec.get("stream", True)}
              for q in spec["questions"]]  # fmt: skip
    records: list[dict] = []
    stop_at = time.monotonic() + spec["seconds"]
    connector = aiohttp.TCPConnector(limit=0)  # keep-alive, one connection per client
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if spec["rate"]:  # open loop: Poisson arrivals
            rng, tasks, i = random.Random(0), [], 0
            while time.monotonic() < stop_at:
                body = bodies[i % len(bodies)]
                tasks.append(asyncio.create_task(_request(session, spec["url"], body)))
                i += 1
                await asyncio.sleep(rng.expovariate(spec["rate"]))
            records = list(await asyncio.gather(*tasks))
        else:  # closed loop: each client sends its next request when the last one ends

            async def client(c: int) -> None:
                i = c
                while time.monotonic() < stop_at:
                    body = bodies[i % len(bodies)]
                    records.append(await _request(session, spec["url"], body))
                    i += spec["clients"]

            await asyncio.gather(*(client(c) for c in range(spec["clients"])))
    return records


def run_clients(spec: dict) -> list[dict]:
    """The load generator in its own process (it must not share this one's interpreter)."""
    out = subprocess.run([sys.executable, __file__, "--client", json.dumps(spec)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


# Who uses the cores: Ray names its worker processes after their actor (setproctitle); a
# replica's decode process is its child.
ROLES = {"replica_http": "ray::ServeReplica:", "proxy": "ray::ProxyActor"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of the replicas, their decode processes and the HTTP proxy (from
    /proc), and of this process's finished children (the load generators)."""
    tick = os.sysconf("SC_CLK_TCK")
    processes = {}  # pid → (parent, title, cpu seconds)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        processes[pid] = (fields[1], title, (int(fields[11]) + int(fields[12])) / tick)
    used = dict.fromkeys([*ROLES, "decode_process"], 0.0)
    for parent, title, seconds in processes.values():
        for role, prefix in ROLES.items():
            if title.startswith(prefix):
                used[role] += seconds
        if processes.get(parent, ("", ""))[1].startswith(ROLES["replica_http"]):
            used["decode_process"] += seconds
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used | {"load_generator": children.ru_utime + children.ru_stime}


# --- figures ----------------------------------------------------------------------------------


def summarize(
    name: str,
    records: list[dict],
    start_stats: dict,
    end_stats: dict,
    cpu: dict[str, float] | None = None,
) -> dict:
    """A level's figures; `cpu`: CPU seconds per role over the level."""
    ok = [r for r in records if r["ok"]]
    start = min((r["sent"] for r in records), default=0.0)
    span = max((r["end"] for r in ok), default=start + 1) - start
    steps = {k: end_stats["batch_size_histogram"][k] - start_stats["batch_size_histogram"][k]
             for k in end_stats["batch_size_histogram"]}  # fmt: skip
    formed = end_stats["steps"] - start_stats["steps"]
    mean = (end_stats["mean_batch_size"] * end_stats["steps"]
            - start_stats["mean_batch_size"] * start_stats["steps"]) / max(formed, 1)  # fmt: skip
    admitted = end_stats["admitted"] - start_stats["admitted"]
    key = "mean_time_to_first_block_s"
    server_first = end_stats[key] * end_stats["admitted"]
    server_first -= start_stats[key] * start_stats["admitted"]
    latency = [r["end"] - r["sent"] for r in ok]
    first = [r["first"] for r in ok]
    return {
        "level": name,
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / span,
        "requests_per_s": len(ok) / span,
        "p50_latency_s": statistics.median(latency) if latency else float("nan"),
        "p99_latency_s": _percentile(latency, 0.99),
        "p50_first_block_s": statistics.median(first) if first else float("nan"),
        # In the replica: from joining the loop's queue to the first update (no HTTP).
        "server_mean_first_block_s": server_first / max(admitted, 1),
        "tokens_per_forward": sum(r["tokens"] for r in ok) / max(sum(r["forwards"] for r in ok), 1),
        "mean_batch_size": round(mean, 2),
        "batch_size_histogram": steps,
        # Share of the machine's cores per role over the level (all of them: 1.0).
        "cpu_share": {
            role: round(seconds / (span * (os.cpu_count() or 1)), 3)
            for role, seconds in (cpu or {}).items()
        },
    }


def _stats(base: str) -> dict:
    import requests

    return requests.get(f"{base}/stats", timeout=30).json()["loop"]


def serve_levels(settings: dict, questions: list[str], seconds: float) -> list[dict]:
    import ray
    from ray import serve

    from llada_ray.serve.app import build

    levels = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        for name, cache_mb in (("cached", 256.0), ("uncached", 0.0)):
            app = settings | {"decoding": {"prefix_cache_mb": cache_mb}}
            serve.run(build(app), name=name, route_prefix=f"/{name}")

        def level(name: str, app: str, clients: int, system: bool, rate: float = 0.0,
                  stream: bool = True) -> dict:  # fmt: skip
            base = f"http://127.0.0.1:{PORT}/{app}"
            spec = {"url": f"{base}/v1/chat/completions", "questions": questions,
                    "clients": clients, "seconds": seconds, "system": system,
                    "rate": rate, "stream": stream}  # fmt: skip
            before, cpu = _stats(base), cpu_seconds()
            records = run_clients(spec)
            used = {k: v - cpu[k] for k, v in cpu_seconds().items()}
            row = summarize(name, records, before, _stats(base), used)
            print(json.dumps(row), flush=True)
            return row

        for app in ("cached", "uncached"):  # warm-up: first requests, thread pools
            run_clients({"url": f"http://127.0.0.1:{PORT}/{app}/v1/chat/completions",
                         "questions": questions, "clients": 4, "seconds": 3.0, "system": True,
                         "rate": 0.0})  # fmt: skip
        for clients in (1, 4, 16, 32):
            levels.append(level(f"closed_{clients}", "cached", clients, False))
        # A lever: one message per request through the proxy instead of one per block.
        levels.append(level("closed_16_not_streamed", "cached", 16, False, stream=False))
        rate = levels[2]["requests_per_s"] / 2
        levels.append(level(f"poisson_{rate:.2f}_per_s", "cached", 0, False, rate))
        for clients in (1, 16):
            for app in ("cached", "uncached"):
                levels.append(level(f"system_prompt_{app}_{clients}", app, clients, True))
    finally:
        serve.shutdown()
        ray.shutdown()
    return levels


def engine_alone(settings: dict, questions: list[str], seconds: float) -> list[dict]:
    """The 1- and 16-client closed loops on the same decode loop in this process: no HTTP, no
    Serve."""
    from llada_ray.config import ServeConfig
    from llada_ray.serve.engine import TextEngine
    from llada_ray.serve.loop import EngineLoop

    engine = TextEngine.load(ServeConfig.model_validate(settings))
    loop = EngineLoop(engine)
    jobs = [
        engine.job(
            engine.encode_chat(_body(q, False)["messages"]), max_tokens=MAX_TOKENS, ignore_eos=True
        )
        for q in questions
    ]

    async def run(clients: int) -> list[dict]:
        records: list[dict] = []
        stop_at = time.monotonic() + seconds

        async def client(c: int) -> None:
            i = c
            while time.monotonic() < stop_at:
                sent, first, tokens = time.monotonic(), None, 0
                async for update in loop.submit(jobs[i % len(jobs)]).updates():
                    first = first or time.monotonic()
                    tokens = update.completion_tokens
                end = time.monotonic()
                records.append({"sent": sent, "end": end, "first": first - sent,
                                "tokens": tokens, "forwards": update.forwards,
                                "ok": True})  # fmt: skip
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
        return records

    asyncio.run(run(4))  # warm-up
    levels = []
    for clients in (1, 16):
        before, cpu = loop.stats.summary(), resource.getrusage(resource.RUSAGE_SELF)
        records = asyncio.run(run(clients))
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = {"engine_process": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime}
        levels.append(summarize(f"engine_alone_{clients}", records, before,
                                loop.stats.summary(), used))  # fmt: skip
        print(json.dumps(levels[-1]), flush=True)
    return levels


def target(value: float, goal: float, higher: bool, note: str = "") -> dict:
    met = value >= goal if higher else value <= goal
    return {"value": value, "goal": goal, "higher_is_better": higher, "met": met, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per level")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the load generator's own process
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(_load(json.loads(args.client)))))
        return

    from llada_ray.config import load_config
    from llada_ray.data import tasks

    task = load_config(ROOT / "configs" / "tiny.yaml").data.task  # the demo model's task
    questions = [ex.prompt for ex in tasks.examples(99, 0, 64, "heldout", task)]
    settings = {"model": str(model_dir()), "model_name": "tiny", "threshold": 0.9,
                "max_batch_size": 16, "max_ongoing_requests": 64, "num_cpus": 1,
                "torch_threads": 1, "port": PORT}  # fmt: skip
    levels = serve_levels(settings, questions, args.seconds)
    alone = engine_alone(settings, questions, args.seconds)

    by = {lvl["level"]: lvl for lvl in levels}
    scaling = by["closed_16"]["tokens_per_s"] / by["closed_1"]["tokens_per_s"]
    overhead = 1 - by["closed_16"]["tokens_per_s"] / alone[1]["tokens_per_s"]
    alone_scaling = alone[1]["tokens_per_s"] / alone[0]["tokens_per_s"]
    ttfb = {f"{where}_{n}_clients": by[f"system_prompt_uncached_{n}"][key]
            / by[f"system_prompt_cached_{n}"][key]
            for n in (1, 16)
            for where, key in (("client", "p50_first_block_s"),
                               ("server", "server_mean_first_block_s"))}  # fmt: skip
    errors = sum(lvl["errors"] for lvl in levels)
    setup = {"model": "tiny export (configs/tiny.yaml)", "replicas": 1, "max_batch_size": 16,
             "threshold": 0.9, "max_tokens": MAX_TOKENS, "ignore_eos": True,
             "system_prompt_tokens": len(SYSTEM), "seconds_per_level": args.seconds,
             "cpus": os.cpu_count()}  # fmt: skip
    report = {
        "setup": setup,
        "levels": [*levels, *alone],
        "first_block_speedup_cache_on_vs_off": ttfb,
        "targets": {
            "tokens_per_s_16_vs_1_clients": target(
                scaling, 3.0, True, f"the engine alone scales {alone_scaling:.2f}x"
            ),
            "serve_overhead_vs_engine_alone_16_clients": target(overhead, 0.15, False),
            "first_block_cache_on_vs_off_shared_512_prompt_1_client": target(
                ttfb["client_1_clients"],
                2.0,
                True,
                f"in the replica (no HTTP): {ttfb['server_1_clients']:.2f}x",
            ),
            "errors": target(errors, 0, False),
        },
    }
    out = ROOT / "bench" / "results" / "serve.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'level':<30}{'req':>6}{'err':>5}{'tok/s':>9}{'req/s':>7}{'p50 s':>7}{'p99 s':>7}"
          f"{'1st blk':>8}{'server':>7}{'TPF':>6}{'batch':>7}  cpu share")  # fmt: skip
    for lvl in report["levels"]:
        print(f"{lvl['level']:<30}{lvl['requests']:>6}{lvl['errors']:>5}"
              f"{lvl['tokens_per_s']:>9.1f}{lvl['requests_per_s']:>7.2f}"
              f"{lvl['p50_latency_s']:>7.2f}{lvl['p99_latency_s']:>7.2f}"
              f"{lvl['p50_first_block_s']:>8.3f}{lvl['server_mean_first_block_s']:>7.3f}"
              f"{lvl['tokens_per_forward']:>6.1f}"
              f"{lvl['mean_batch_size']:>7.1f}  {lvl['cpu_share']}")  # fmt: skip
    for name, t in report["targets"].items():
        print(f"{name}: {t['value']:.3f} (goal {t['goal']}) met {t['met']} {t['note']}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
