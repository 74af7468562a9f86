"""What a finished pipeline leaves behind: the exported model, its lineage and its evaluation.

The export is the last model's files (safetensors, config, tokenizer) plus `lineage.json` naming
every stage's output and config hash, and the block size the model is served with. The MLflow
model registry gets a version that points at the export in our storage (the weights are not
copied into MLflow), with an alias and a tag per upstream stage. The parent run gets the plots:
loss per stage over global tokens, the block-size schedule, and the task accuracy after each
post-training stage (when the config asks for it).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import ray
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from llada_ray import tracking
from llada_ray.config import PipelineConfig
from llada_ray.data import tasks
from llada_ray.model.io import MODEL_FILES
from llada_ray.pipeline import manifests
from llada_ray.pipeline.graph import stage_graph
from llada_ray.train import checkpoint
from llada_ray.train.plan import served_block_size, units

# Evaluated after training (merge: the model before post-training; ar_sft: the AR baseline).
EVALUATED = ("merge", "sft", "cap", "dpo", "ar_sft")


def export_path(run_root: str) -> str:
    return f"{run_root}/models/export"


def uri_of(fs: pafs.FileSystem, path: str | None) -> str | None:
    """A storage path as users write it (s3://bucket/key); None stays None."""
    if path is None or not isinstance(fs, pafs.S3FileSystem):
        return path
    return f"s3://{path}"


def export(cfg: PipelineConfig, fs: pafs.FileSystem, run_root: str, model: str) -> str:
    """Copy the model's files to the export directory, lineage last (it marks it complete)."""
    dest = export_path(run_root)
    if fs.get_file_info(dest).type != pafs.FileType.NotFound:
        fs.delete_dir(dest)
    fs.create_dir(dest, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(model)):
        if (
            info.is_file
            and info.base_name.endswith(MODEL_FILES)
            and info.base_name != "manifest.json"
        ):
            fs.copy_file(info.path, f"{dest}/{info.base_name}")
    committed = manifests.read_all(fs, run_root)
    lineage = {
        "pipeline": cfg.name,
        "model": uri_of(fs, model),
        "code_version": manifests.code_version(),
        "block_size": served_block_size(cfg),  # what `llada-ray serve` decodes it with
        "stages": [
            {
                "stage": s.name,
                "config_hash": s.config_hash,
                "output": uri_of(fs, committed.get(s.name, {}).get("output")),
            }
            for s in stage_graph(cfg)
            if s.kind != "export"
        ],
    }
    with fs.open_output_stream(f"{dest}/lineage.json") as f:
        f.write(json.dumps(lineage, indent=2).encode())
    return dest


def finish(
    cfg: PipelineConfig,
    fs: pafs.FileSystem,
    run_root: str,
    export_dir: str,
    parent_run_id: str,
    say: Callable[[str], None],
) -> dict:
    """Evaluation, plots and the registry entry; the export stage's summary."""
    client = MlflowClient(tracking.resolve_uri(cfg.tracking.uri))
    committed = manifests.read_all(fs, run_root)
    client.log_dict(parent_run_id, committed, "stages.json")  # every stage's commit record
    summary: dict = {}
    if cfg.evaluation.task_examples:
        models = {s: committed[s]["output"] for s in EVALUATED if s in committed}
        task = ray.remote(num_cpus=1, num_gpus=1 if cfg.scaling.use_gpu else 0)(evaluate_models)
        accuracy = ray.get(task.remote(cfg, models))
        say(f"{'':<16} task settings: {tasks.describe(cfg.data.task)}")
        say(f"{'':<16} {tasks.counts(cfg.data, cfg.evaluation.task_examples)}")
        for stage, figures in accuracy.items():
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in figures["per_task"].items())
            say(
                f"{'':<16} {stage:<7} exact match {figures['accuracy']:.1%} ({kinds}), "
                f"TPF {figures['tokens_per_forward']:.2f}, "
                f"repeated 3-grams {figures['repeated_3gram_share']:.1%}"
            )
            metrics = {
                f"task_accuracy_{stage}": figures["accuracy"],
                f"task_similarity_{stage}": figures["similarity"],
                f"task_tpf_{stage}": figures["tokens_per_forward"],
                f"task_repeated_3grams_{stage}": figures["repeated_3gram_share"],
            }
            metrics |= {f"task_accuracy_{stage}/{k}": v for k, v in figures["per_task"].items()}
            for key, value in metrics.items():
                client.log_metric(parent_run_id, key, value)
        summary["task_accuracy"] = accuracy
    with tempfile.TemporaryDirectory() as tmp:
        for path in plots(cfg, client, committed, summary.get("task_accuracy"), Path(tmp)):
            client.log_artifact(parent_run_id, str(path), "plots")
    summary["registered"] = register(cfg, client, fs, export_dir, committed, parent_run_id)
    return summary


def register(
    cfg: PipelineConfig,
    client: MlflowClient,
    fs: pafs.FileSystem,
    export_dir: str,
    committed: dict[str, dict],
    run_id: str,
) -> dict:
    name = cfg.tracking.registered_model or cfg.name
    try:
        client.create_registered_model(name, description="block-diffusion LM from llada-ray")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {f"upstream.{stage}": str(uri_of(fs, m.get("output"))) for stage, m in committed.items()}
    tags |= {"config_hash": stage_graph(cfg)[-1].config_hash, "pipeline": cfg.name}
    version = client.create_model_version(name, uri_of(fs, export_dir), run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, cfg.tracking.model_alias, version.version)
    return {"name": name, "version": int(version.version), "alias": cfg.tracking.model_alias}


def evaluate_models(cfg: PipelineConfig, models: dict[str, str]) -> dict[str, dict]:
    """Task accuracy and TPF of each stage's model on held-out examples of the training
    settings, decoded as served: chat prompts, the block decoder with its cache (the AR baseline
    with the AR decoder)."""
    import torch

    from llada_ray.decoding import ARDecoder, BlockDecoder, Decoder, EngineOptions, Sampling
    from llada_ray.evaluation import evaluate
    from llada_ray.model import DiffusionLM, load_model
    from llada_ray.storage import storage_root

    fs, _ = storage_root(cfg.storage)
    ev = cfg.evaluation
    examples = tasks.examples(ev.seed, 0, ev.task_examples, "heldout", cfg.data.task)
    block = served_block_size(cfg)
    sampling = Sampling(**ev.decode_mode.model_dump(), max_new_tokens=ev.max_new_tokens)
    out = {}
    for stage, path in models.items():
        fetched = checkpoint.fetch(fs, path)
        if fetched is None:
            raise RuntimeError(f"evaluate: the output of {stage} at {path} does not verify")
        try:
            hf, tok = load_model(fetched.local)
        finally:
            fetched.cleanup()
        if cfg.scaling.use_gpu and torch.cuda.is_available():
            hf = hf.to("cuda", getattr(torch, cfg.model.dtype))
        dlm = DiffusionLM(hf, attention=cfg.model.attention)
        engine = EngineOptions(ev.batch_size, ev.decoding.length_bucket, ev.decoding.compile,
                               ev.decoding.prefix_cache_mb, block)  # fmt: skip
        if stage == "ar_sft":
            decoder: Decoder = ARDecoder(dlm, tok.eos_token_id, engine=engine)
        else:
            decoder = BlockDecoder(dlm, tok.eos_token_id, block, engine=engine,
                                   multi_block_edit=ev.decoding.multi_block_edit)  # fmt: skip
        result = evaluate(decoder, tok, examples, sampling)
        out[stage] = result.summary() | {"settings": tasks.describe(cfg.data.task)}
    return out


def plots(
    cfg: PipelineConfig,
    client: MlflowClient,
    committed: dict[str, dict],
    accuracy: dict[str, dict] | None,
    directory: Path,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # Loss per stage over global tokens: each run's loss by step, placed after the runs before it.
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for unit in units(cfg):
        summary = committed.get(unit.name, {}).get("summary", {})
        if unit.objective == "merge" or not summary.get("step") or experiment is None:
            continue
        run = tracking.latest_run(client, experiment.experiment_id, cfg, unit.name)
        if run is None:
            continue
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        per_step = (summary.get("tokens") or 0) / summary["step"]
        ax.plot(
            [offset + m.step * per_step for m in history],
            [m.value for m in history],
            label=unit.name,
            linewidth=1,
        )
        offset += summary.get("tokens") or 0
    ax.set_xlabel("global tokens")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"{cfg.name}: loss per stage")
    made.append(_save(fig, directory / "loss_per_stage.png"))

    # The block-size schedule of CPT (WSD): block size over CPT tokens.
    fig, ax = plt.subplots(figsize=(8, 3))
    start = 0
    for unit in units(cfg):
        if unit.objective in ("bd", "stable"):
            ax.hlines(unit.block_size, start, start + unit.tokens, linewidth=3)
            ax.annotate(unit.name.removeprefix("cpt-"), (start, unit.block_size), fontsize=6)
            start += unit.tokens
    ax.set_yscale("log", base=2)
    ax.set_xlabel("CPT tokens")
    ax.set_ylabel("block size")
    ax.set_title("Warmup–Stable–Decay block-size schedule")
    made.append(_save(fig, directory / "block_size_schedule.png"))

    if accuracy:
        fig, ax = plt.subplots(figsize=(5, 3))
        stages = list(accuracy)
        at = range(len(stages))
        ax.bar(
            [x - 0.2 for x in at],
            [accuracy[s]["accuracy"] for s in stages],
            0.4,
            label="exact match",
        )
        ax.bar(
            [x + 0.2 for x in at],
            [accuracy[s]["similarity"] for s in stages],
            0.4,
            label="answer similarity",
        )
        ax.set_xticks(list(at), stages)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("verifiable task after each post-training stage")
        made.append(_save(fig, directory / "task_accuracy.png"))
    return made


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
