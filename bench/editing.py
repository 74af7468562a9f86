"""Token editing (LLaDA2.1), measured: the same conversion trained with and without the T2T
stream, decoded in the Speed and Quality modes.

The base is `configs/tiny.yaml` as `make demo` trains it (trained first if it is not there).
The variant `<name>-editing` repeats its conversion from the base's AR parent at the same
budget (CPT, merge, SFT, CAP, DPO: the same rows, steps and rates) with `editing:` on in the
stages it names. Both final models answer the held-out questions as the pipeline asks them.

    python bench/editing.py
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from llada_ray.config import EditingConfig, PipelineConfig, load_config
from llada_ray.pipeline.scheduler import run_pipeline
from llada_ray.train.outputs import output_of, pipeline_root
from llada_ray.train.plan import find_unit

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.yaml"


def base_config() -> PipelineConfig:
    return load_config(CONFIG).anchored(ROOT)


def model_dir(cfg: PipelineConfig, run: str) -> str:
    fs, root = pipeline_root(cfg)
    fetched = output_of(fs, root, find_unit(cfg, run))
    if fetched is None:
        raise RuntimeError(f"{cfg.name}: {run} has no committed output")
    return str(fetched.local)


def with_editing(base: PipelineConfig, editing: EditingConfig | None) -> PipelineConfig:
    """The base's conversion, from its AR parent, with the editing stream on (or off: a base
    that trains with editing gets its same-budget control)."""
    raw = base.model_dump(mode="json")
    raw["name"] = f"{base.name}-{'editing' if editing else 'no-editing'}"
    raw["model"]["source"] = model_dir(base, "ar_pretrain")
    raw["tokenizer"] = {"source": "model"}
    raw["stages"] = [s for s in raw["stages"] if s["stage"] not in ("ar_pretrain", "ar_sft")]
    raw["editing"] = editing and editing.model_dump(mode="json")
    return PipelineConfig.model_validate(raw)


def train() -> tuple[PipelineConfig, PipelineConfig]:
    """(without editing, with editing): the base and its variant, trained if not there."""
    base = base_config()
    say = lambda line: print(line, flush=True)  # noqa: E731
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        run_pipeline(base, say=say)
        other = with_editing(base, None if base.editing else EditingConfig())
        run_pipeline(other, say=say)
    finally:
        ray.shutdown()
    return (other, base) if base.editing else (base, other)


if __name__ == "__main__":
    train()
