"""The local stack, proven end to end: 2 Ray Train workers train the tiny diffusion model under
the BD mask, checkpoint to the S3 server, resume from it, and log to the MLflow server."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import ray.cloudpickle

pytestmark = pytest.mark.integration

SEQ_LEN, BLOCK, MICRO_BATCH = 64, 16, 4


def train_loop(config: dict) -> None:
    """A few BD steps per worker; a checkpoint (weights, optimizer, step, run id) every step."""
    import mlflow
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from llada_ray.config import TinyModelConfig
    from llada_ray.diffusion.losses import elbo_loss
    from llada_ray.diffusion.masks import position_ids_for
    from llada_ray.diffusion.noise import forward_mask, sample_mask_rates
    from llada_ray.model import DiffusionLM, build_tiny_model, ensure_mask_token, save_model
    from llada_ray.model.adapter import block_diffusion_inputs

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tokenizer, seed=0)
    ensure_mask_token(hf, tokenizer, "<|mask|>")
    dlm = DiffusionLM(hf, attention="block_sparse", tile_size=32)
    optimizer = torch.optim.AdamW(dlm.parameters(), lr=1e-3)

    step, run_id, resumed = 0, None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            dlm.hf.load_state_dict(load_file(f"{d}/model.safetensors"), strict=False)
            optimizer.load_state_dict(torch.load(f"{d}/optimizer.pt", weights_only=True))
            meta = json.loads(Path(d, "meta.json").read_text())
        step, run_id = meta["step"], meta["run_id"]
        adam_steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
        resumed = {"resumed_from": step, "adam_steps_at_resume": adam_steps.pop()}

    model = ray.train.torch.prepare_model(dlm)
    if rank == 0:
        mlflow.set_tracking_uri(config["mlflow_uri"])
        if run_id is None:
            mlflow.set_experiment("stack-test")
            run_id = mlflow.start_run(run_name="bd-stack").info.run_id
            mlflow.log_params(
                {"block_size": BLOCK, "seq_len": SEQ_LEN, "workers": ctx.get_world_size()}
            )
        else:
            mlflow.start_run(run_id=run_id)  # a restarted attempt continues the same run

    while step < config["steps"]:
        gen = torch.Generator().manual_seed(1000 * step + rank)  # position-determined data
        x0 = torch.randint(5, len(tokenizer), (MICRO_BATCH, SEQ_LEN), generator=gen)
        docs = (torch.arange(SEQ_LEN) >= 40).long().expand(MICRO_BATCH, -1)  # two documents
        t = sample_mask_rates(MICRO_BATCH, antithetic=True, generator=gen)
        noised = forward_mask(x0, t, torch.ones_like(x0, dtype=torch.bool), dlm.mask_token_id, gen)
        inputs = block_diffusion_inputs(noised.xt, x0, docs, position_ids_for(docs, True), BLOCK)
        loss = elbo_loss(model(**inputs), x0, noised.masked, t).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        metrics = {"step": step, "loss": loss.item(), **resumed}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                mlflow.log_metric("loss", loss.item(), step=step)
                save_model(dlm.hf, tokenizer, d)
                torch.save(optimizer.state_dict(), f"{d}/optimizer.pt")
                Path(d, "meta.json").write_text(json.dumps({"step": step, "run_id": run_id}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
    if rank == 0:
        mlflow.end_run()


def test_train_checkpoint_resume_on_s3_with_mlflow(
    ray_cluster, s3, mlflow_tracking, tiny_tokenizer, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, Result, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llada_ray.config import StorageConfig
    from llada_ray.storage import storage_root

    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    fs, root = storage_root(
        StorageConfig(root=f"s3://{s3.bucket}/runs", endpoint_url=s3.endpoint_url)
    )

    def fit(steps: int) -> Result:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "steps": steps,
                "tokenizer_dir": str(tmp_path / "tokenizer"),
                "mlflow_uri": mlflow_tracking.uri,
            },
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(
                name="stack",
                storage_path=root,
                storage_filesystem=fs,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        return trainer.fit()

    first = fit(steps=3)
    assert first.error is None
    assert first.metrics["step"] == 3 and "resumed_from" not in first.metrics
    stored = s3.keys("runs/stack/")
    assert any(k.endswith("model.safetensors") for k in stored)
    assert any(k.endswith("optimizer.pt") for k in stored)

    # Same run name and storage: Ray Train V2 hands the latest checkpoint to the new attempt.
    second = fit(steps=5)
    assert second.error is None
    assert second.metrics["step"] == 5
    assert second.metrics["resumed_from"] == 3
    assert second.metrics["adam_steps_at_resume"] == 3
    kept = {k.split("/")[2] for k in s3.keys("runs/stack/") if k.endswith("meta.json")}
    assert len(kept) == 2  # num_to_keep

    client = MlflowClient(mlflow_tracking.uri)
    experiment = client.get_experiment_by_name("stack-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params == {"block_size": str(BLOCK), "seq_len": str(SEQ_LEN), "workers": "2"}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # resumed, no step logged twice


# Workers get train_loop by value: tests/ is not on their import path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
