"""MLflow: a run per stage / CPT phase, a child of the pipeline's run when one is given.

The driver opens the run and logs the config; rank 0 logs metrics by global step (train.loop);
the driver attaches the checkpoint manifest at the end. A resubmitted run finds its unfinished
MLflow run by tags and continues it, so one training run is one MLflow run however often it
restarts.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from mlflow.entities import Param, Run, RunStatus
from mlflow.tracking import MlflowClient

from llada_ray.config import PipelineConfig

PIPELINE_TAG = "llada_ray.pipeline"
RUN_TAG = "llada_ray.run"


def resolve_uri(uri: str) -> str:
    """A relative sqlite path made absolute, so workers and later commands find the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def _artifact_location(uri: str) -> str | None:
    """Beside a sqlite database (MLflow's default is ./mlruns in whatever directory the driver
    runs in); a tracking server decides for itself."""
    uri = resolve_uri(uri)
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def _flat(prefix: str, value: object) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= _flat(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: str(value)[:500]}


def latest_run(
    client: MlflowClient, experiment_id: str, cfg: PipelineConfig, run_name: str
) -> Run | None:
    """The newest MLflow run named `run_name` in this pipeline, or None."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{cfg.name}' and tags.`{RUN_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def start_run(
    cfg: PipelineConfig,
    run_name: str,
    params: dict,
    parent_run_id: str | None = None,
) -> str:
    """The MLflow run id for `run_name` of this pipeline: the unfinished one, or a new one."""
    client = MlflowClient(resolve_uri(cfg.tracking.uri))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(
            cfg.tracking.experiment, artifact_location=_artifact_location(cfg.tracking.uri)
        )
    )
    found = latest_run(client, experiment_id, cfg, run_name)
    if found and found.info.status != RunStatus.to_string(RunStatus.FINISHED):
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {PIPELINE_TAG: cfg.name, RUN_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    items = [Param(k, v) for k, v in sorted(_flat("", params).items())]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])
    client.log_text(
        run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml"
    )
    return run_id


def finish_run(
    cfg: PipelineConfig, run_id: str, manifest: dict | None, failed: bool = False
) -> None:
    client = MlflowClient(resolve_uri(cfg.tracking.uri))
    if manifest is not None:
        client.log_dict(run_id, manifest, "checkpoint_manifest.json")
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
