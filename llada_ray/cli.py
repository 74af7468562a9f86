"""`llada-ray …`: the command line. Each command validates its config before doing anything."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from llada_ray.config import ConfigError, CptStage, PipelineConfig, load_config
from llada_ray.diffusion.schedule import plan_phases


def describe(cfg: PipelineConfig) -> str:
    """The run as a reader wants it: the stages, and the CPT phases with their kind."""
    lines = [
        f"pipeline {cfg.name!r}: model {cfg.model.source}, seq_len {cfg.data.seq_len}, "
        f"storage {cfg.storage.root}, tracking {cfg.tracking.uri}"
    ]
    for stage in cfg.stages:
        lines.append(f"  {stage.stage}")
        if isinstance(stage, CptStage):
            phases = [(p.name, p.block_size, p.tokens, p.lr) for p in stage.phases]
            for phase in plan_phases(phases, cfg.data.seq_len):
                lines.append(
                    f"    {phase.name:<14} {phase.kind:<7} block {phase.block_size:>5}  "
                    f"{phase.tokens:>12,} tokens  lr {phase.lr:g}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llada-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a pipeline config and print its plan")
    validate.add_argument("config")
    pack = commands.add_parser("pack", help="tokenize and pack the config's data into storage")
    pack.add_argument("--config", required=True)
    run = commands.add_parser("run", help="run the whole pipeline; committed stages are skipped")
    run.add_argument("config")
    run.add_argument("--force-from", metavar="STAGE", help="redo this stage and all after it")
    status = commands.add_parser("status", help="the stage table of a pipeline, from storage")
    status.add_argument("config")
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API on Ray Serve")
    serve.add_argument("model", help="model directory or s3:// URI (an export or a checkpoint)")
    serve.add_argument("--config", help="serve settings: a ServeConfig YAML or serve/config.yaml")
    serve.add_argument("--address", help="a running Ray cluster; default: start one here")
    serve.add_argument("--name", default="llada", help="the Serve application's name")
    serve.add_argument("--host", help="HTTP host (overrides the config)")
    serve.add_argument("--port", type=int, help="HTTP port (overrides the config)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "run":
        from llada_ray.pipeline.scheduler import main as run_pipeline

        force = ["--force-from", args.force_from] if args.force_from else []
        return run_pipeline(["--config", args.config, *force])

    try:
        cfg = load_config(args.config)
    except (ConfigError, ValidationError) as err:
        print(f"invalid config {args.config}:\n{err}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(describe(cfg))
        return 0
    if args.command == "status":
        from llada_ray.pipeline.status import render

        print(render(cfg))
        return 0
    return _pack(cfg)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from llada_ray.config import ServeConfig, read_yaml

    try:
        raw = read_yaml(args.config) if args.config else {}
        if "applications" in raw:  # a Serve config file: our settings are the app's args
            http = raw.get("http_options", {})
            app = raw["applications"][0]
            raw = {k: v for k, v in http.items() if k in ("host", "port")}
            raw |= {"route_prefix": app.get("route_prefix", "/"), **app.get("args", {})}
        model = args.model  # replicas run elsewhere: a local path must not depend on our cwd
        if not model.startswith("s3://"):
            model = str(Path(model).expanduser().resolve())
        overrides = {"model": model, "host": args.host, "port": args.port}
        cfg = ServeConfig.model_validate(raw | {k: v for k, v in overrides.items() if v})
    except (ConfigError, ValidationError) as err:
        print(f"invalid serve config {args.config or ''}:\n{err}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from llada_ray.serve.app import build

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and os.environ.get(cfg.api_key_env):
        print(
            f"note: replicas read {cfg.api_key_env} on the cluster's nodes, not from this "
            "shell; set it there (e.g. a KubeRay secret)",
            file=sys.stderr,
        )
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build(cfg.model_dump()), name=args.name, route_prefix=cfg.route_prefix)
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
        print(f"serving {cfg.model_name!r} ({cfg.model}) at {url}; Ctrl-C stops", flush=True)
        stopped.wait()
    finally:
        if address:  # someone else's cluster: take our app away, leave the rest
            serve.delete(args.name)
        ray.shutdown()  # a cluster started here stops with its Serve apps
    return 0


def _pack(cfg: PipelineConfig) -> int:
    from llada_ray.data.documents import BadRowError
    from llada_ray.data.pack import pack_all
    from llada_ray.storage import storage_root

    fs, root = storage_root(cfg.storage)
    try:
        packed = pack_all(cfg, fs, f"{root}/{cfg.name}")
    except (BadRowError, FileNotFoundError) as err:
        print(f"packing failed: {err}", file=sys.stderr)
        return 1
    for name, p in packed.items():
        m = p.manifest
        state = "reused" if p.reused else "packed"
        line = f"{name:<14} {state:<7} rows {m['rows']:>9,}"
        if "tokens" in m:
            line += (
                f"  documents {m['documents']:>9,}  tokens {m['tokens']:>12,}"
                f"  padding {m['padding_fraction']:.3%}"
            )
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(m["bad_rows"].items())) or "none"
        print(f"{line}  skipped: {skipped}\n{'':<14} {p.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
