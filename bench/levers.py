"""The conversion's levers, measured: variants of the demo's pipeline, each from the demo's own
models, evaluated on the honest held-out set.

The base is `configs/tiny.yaml` as `make demo` trains it (trained first if it is not there). A
variant is a pipeline of its own (`<name>-<lever>`, its own storage and MLflow runs) whose
`model.source` is one of the base's models, with one setting changed:
  - `cpt_0.5x`, `cpt_2x`: from the AR parent, every CPT phase's token budget halved / doubled,
    then merge, SFT, CAP, DPO as in the base (the base is `cpt_1x`);
  - `sft_tmax_1`: from the merged model, SFT and CAP draw t up to 1.0 (fully masked blocks, as
    every decode starts) instead of 0.8;
  - `cap_lambda_0`: from the merged model, CAP with λ = 0: SFT run for CAP's extra steps on
    CAP's rows, the equal-steps comparison for CAP's entropy term.
Every model is evaluated as the pipeline does it (`evaluation`: the held-out questions at the
served τ and block; bench/decode.py asks the AR parent and baseline the same ones). Rows, curves
(accuracy against CPT tokens) and the EOS-padding share of SFT's targets go to
bench/results/levers.json and levers.png, and to an MLflow run `levers`.

    python bench/levers.py [--only LEVER ...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from llada_ray import tracking
from llada_ray.config import LLADA2_BLOCK_SIZE, PipelineConfig, load_config
from llada_ray.data import tasks
from llada_ray.data.chat import sft_row
from llada_ray.data.corpus import task_examples
from llada_ray.model.io import load_tokenizer
from llada_ray.pipeline import manifests
from llada_ray.pipeline.lineage import EVALUATED, evaluate_models
from llada_ray.pipeline.scheduler import run_pipeline
from llada_ray.train.outputs import output_of, pipeline_root
from llada_ray.train.plan import find_unit, served_block_size

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.yaml"
POST = ("sft", "cap", "dpo")


def base_config() -> PipelineConfig:
    return load_config(CONFIG).anchored(ROOT)


def stage(cfg: PipelineConfig, name: str) -> dict:
    return next(s for s in cfg.model_dump(mode="json")["stages"] if s["stage"] == name)


def model_dir(cfg: PipelineConfig, run: str) -> str:
    fs, root = pipeline_root(cfg)
    fetched = output_of(fs, root, find_unit(cfg, run))
    if fetched is None:
        raise RuntimeError(f"{cfg.name}: {run} has no committed output")
    return str(fetched.local)


def variant(base: PipelineConfig, lever: str, source: str, stages: list[dict]) -> PipelineConfig:
    """The base with its own name, the given starting model and stages."""
    raw = base.model_dump(mode="json")
    raw["name"] = f"{base.name}-{lever}"
    raw["model"]["source"] = source
    raw["tokenizer"] = {"source": "model"}
    raw["stages"] = stages
    return PipelineConfig.model_validate(raw)


def levers(base: PipelineConfig) -> dict[str, PipelineConfig]:
    post = [stage(base, s) for s in POST]
    cpt = stage(base, "cpt")
    out = {}
    for k in (0.5, 2):
        phases = [p | {"tokens": int(p["tokens"] * k)} for p in cpt["phases"]]
        stages = [cpt | {"phases": phases}, stage(base, "merge"), *post]
        out[f"cpt_{k}x"] = variant(base, f"cpt_{k}x", model_dir(base, "ar_pretrain"), stages)
    merged = model_dir(base, "merge")
    wide = [s | {"t_max": 1.0} if s["stage"] in ("sft", "cap") else s for s in post]
    out["sft_tmax_1"] = variant(base, "sft_tmax_1", merged, wide)
    no_entropy = [s | {"cap_lambda": 0.0} if s["stage"] == "cap" else s for s in post]
    out["cap_lambda_0"] = variant(base, "cap_lambda_0", merged, no_entropy)
    return out


def accuracy(cfg: PipelineConfig) -> dict[str, dict]:
    """Each evaluated stage's model, evaluated as the pipeline does it (its function, run
    again here, so every figure the loop has now is in the rows); KeyError if not trained."""
    fs, root = pipeline_root(cfg)
    committed = manifests.read_all(fs, root)
    if "export" not in committed:  # a pipeline that has not finished is not a row
        raise KeyError(f"{cfg.name} has not finished")
    return evaluate_models(cfg, {s: committed[s]["output"] for s in EVALUATED if s in committed})


def cpt_tokens(cfg: PipelineConfig) -> int:
    return sum(p["tokens"] for p in stage(cfg, "cpt")["phases"])


def eos_padding_share(cfg: PipelineConfig, block_size: int) -> float:
    """Of SFT's maskable targets (the response, its EOS and the EOS padding up to the block
    boundary), the share that is padding, over the SFT sources' rows."""
    tok = load_tokenizer(model_dir(cfg, "merge"))
    padding = maskable = 0
    for source in cfg.data.sft:
        for ex in task_examples(source, cfg.data.task):
            row = sft_row(tasks.chat(ex), tok, block_size, cfg.data.seq_len)
            answer = len(tok(ex.answer, add_special_tokens=False)["input_ids"])
            maskable += len(row.input_ids) - row.prompt_len
            padding += len(row.input_ids) - row.prompt_len - answer - 1  # its own EOS ends it
    return padding / maskable


def rows(name: str, tokens: int, acc: dict[str, dict]) -> list[dict]:
    """One row per evaluated stage of a variant whose conversion had `tokens` CPT tokens."""
    keep = ("accuracy", "per_task", "tokens_per_forward", "repeated_3gram_share", "errors",
            "discarded")  # fmt: skip
    return [
        {"lever": name, "stage": run, "cpt_tokens": tokens} | {k: acc[run][k] for k in keep}
        for run in ("merge", *POST)
        if run in acc
    ]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted((r for r in report["rows"] if r["lever"].startswith("cpt_")),
                   key=lambda r: r["cpt_tokens"])  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4))
    setup = report["setup"]
    for run, style in (("merge", "o--"), ("dpo", "o-")):
        points = [(r["cpt_tokens"], r["accuracy"]) for r in curve if r["stage"] == run]
        label = f"{run} (blocks of {setup['block_size']}, τ {setup['threshold']})"
        ax.plot(*zip(*points, strict=True), style, label=label)
    ax.axhline(report["ar_parent"]["accuracy"], color="grey", linestyle="--", label="AR parent")
    ax.axhline(report["ar_sft"]["accuracy"], color="black", linestyle=":", label="AR baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("CPT tokens")
    ax.set_ylabel(f"exact match, {report['setup']['questions']} held-out questions")
    ax.set_title("conversion: accuracy against CPT budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="levers to (re)run; default: all")
    args = parser.parse_args()
    base = base_config()
    say = lambda line: print(line, flush=True)  # noqa: E731
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        run_pipeline(base, say=say)
        variants = levers(base)
        for name, cfg in variants.items():
            if not args.only or name in args.only:
                run_pipeline(cfg, say=say)
    finally:
        ray.shutdown()
    out = ROOT / "bench" / "results" / "levers.json"
    block, questions = served_block_size(base), base.evaluation.task_examples
    base_acc = accuracy(base)
    # The AR parent and baseline on the same questions: from the bench of the base's models.
    decode = json.loads((ROOT / "bench" / "results" / "decode.json").read_text())
    asked = (decode["setup"]["eval_seed"], decode["setup"]["examples"])
    if asked != (base.evaluation.seed, questions):
        raise SystemExit(
            f"bench/results/decode.json asked (seed, questions) {asked}, the pipeline's "
            "evaluation another set: run bench/decode.py first"
        )
    report = {
        "setup": {
            "questions": questions,
            "block_size": block,
            "threshold": base.evaluation.threshold,
            "task_settings": tasks.describe(base.data.task),
            "question_counts": tasks.counts(base.data, questions),
        },
        "kinds": sorted(base.data.task.kinds),
        "ar_parent": decode["results"]["ar_pretrain"],
        "ar_sft": decode["results"]["ar_sft"],
        "eos_padding_share": {
            f"block {b}": eos_padding_share(base, b) for b in sorted({block, LLADA2_BLOCK_SIZE})
        },
        "rows": rows("cpt_1x", cpt_tokens(base), base_acc),
    }
    for name, cfg in variants.items():
        tokens = cpt_tokens(cfg if name.startswith("cpt_") else base)
        try:
            report["rows"] += rows(name, tokens, accuracy(cfg))
        except KeyError:  # not run (--only)
            continue
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    run_id = tracking.start_run(base, "levers", report["setup"])
    client = MlflowClient(tracking.resolve_uri(base.tracking.uri))
    client.log_artifact(run_id, str(out))
    client.log_artifact(run_id, str(out.with_suffix(".png")))
    client.set_terminated(run_id)
    print(f"\n{'lever':<14}{'stage':<7}{'CPT tokens':>11}{'accuracy':>10}{'TPF':>7}  per kind")
    for r in report["rows"]:
        kinds = " ".join(f"{k} {v:.2f}" for k, v in r["per_task"].items())
        print(f"{r['lever']:<14}{r['stage']:<7}{r['cpt_tokens']:>11,}{r['accuracy']:>10.3f}"
              f"{r['tokens_per_forward']:>7.2f}  {kinds}")  # fmt: skip
    print(f"EOS padding share of SFT targets: {report['eos_padding_share']}")
    print(f"wrote {out.relative_to(ROOT)} and {out.with_suffix('.png').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
