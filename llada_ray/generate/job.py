"""The generation job on the driver: check the paths, run prompts → candidates → teacher, write
each prompt's record as it arrives, and report what was read, skipped and written.

    python jobs/generate.py --config configs/generate-sft.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import ray
import ray.data
from pydantic import ValidationError

from llada_ray.config import ConfigError
from llada_ray.generate.config import GenerateConfig, GenerateError, load_generate_config
from llada_ray.generate.output import check_paths, open_writer
from llada_ray.generate.prompts import candidate_rows, read_prompts
from llada_ray.generate.records import by_prompt, output_record
from llada_ray.generate.teachers import generate_with_transformers, resolve_backend
from llada_ray.generate.vllm_teacher import generate_with_vllm


@dataclass
class GenerateReport:
    backend: str
    output: str
    prompts: int = 0  # input rows, bad ones included
    bad_prompts: dict[str, int] = field(default_factory=dict)
    candidates: int = 0
    truncated: int = 0  # candidates cut at max_new_tokens
    rows: int = 0  # records written
    skipped: dict[str, int] = field(default_factory=dict)  # prompts with no record, by reason
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        def reasons(counts: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"

        return [
            f"backend        {self.backend}",
            f"prompts        {self.prompts} read, bad: {reasons(self.bad_prompts)}",
            f"candidates     {self.candidates} generated, {self.truncated} cut at max_new_tokens",
            f"rows written   {self.rows} in {len(self.files)} file(s) under {self.output}",
            f"skipped        {reasons(self.skipped)}",
            f"time           {self.seconds:.1f}s",
        ]


def generate(cfg: GenerateConfig) -> GenerateReport:
    """Run a generation job on the connected Ray cluster; the counts of what it read and wrote."""
    started = time.perf_counter()
    paths = check_paths(cfg)
    backend = resolve_backend(cfg)
    report = GenerateReport(backend=backend, output=cfg.output)
    # Candidates of one prompt must reach the driver together, and the same input must always
    # write the same files: the whole dataset keeps its order.
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    prompts = read_prompts(paths.input_fs, paths.inputs).materialize()
    errors = Counter(
        reason
        for batch in prompts.select_columns(["error"]).iter_batches(batch_format="pyarrow")
        for reason in batch.column("error").drop_null().to_pylist()
    )
    report.prompts, report.bad_prompts = prompts.count(), dict(sorted(errors.items()))
    # Made before the teacher starts: a replica pool may hold every CPU of the cluster, and a
    # task feeding it would then wait for a CPU forever.
    candidates = candidate_rows(prompts, cfg).materialize()
    rows: Iterable[dict] = []
    if report.prompts > errors.total():
        teach = generate_with_vllm if backend == "vllm" else generate_with_transformers
        batches = teach(candidates, cfg).iter_batches(batch_format="pyarrow", batch_size=None)
        rows = (row for batch in batches for row in batch.to_pylist())

    writer = open_writer(paths, overwrite=cfg.overwrite)
    skipped: Counter[str] = Counter()
    for group in by_prompt(rows):
        report.candidates += len(group)
        report.truncated += sum(not c["finished"] for c in group)
        record = output_record(group, cfg)
        if isinstance(record, str):
            skipped[record] += 1
        else:
            writer.write(record)
    writer.flush()
    report.rows, report.files = writer.rows, writer.files
    report.skipped = dict(sorted(skipped.items()))
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    """`python jobs/generate.py --config C`: SFT chats or DPO pairs from an AR teacher."""
    parser = argparse.ArgumentParser(prog="jobs/generate.py", description=main.__doc__)
    parser.add_argument("--config", required=True, help="generation YAML")
    args = parser.parse_args(argv)
    try:  # a bad config, input or output fails here, before anything reaches the cluster
        cfg = load_generate_config(args.config)
        check_paths(cfg)
    except (ConfigError, ValidationError, GenerateError) as err:
        print(f"invalid config {args.config}:\n{err}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / the job's cluster, else a local one
    try:
        report = generate(cfg)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0
