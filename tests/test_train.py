"""Training runs on a real Ray cluster, S3 server and MLflow server (tests/stack.py): exact resume
after a killed worker, torn checkpoints skipped, sharded strategies. Every stage kind trains in
tests/test_pipeline.py's reference pipeline."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from llada_ray.config import PipelineConfig
from llada_ray.train import checkpoint
from llada_ray.train.outputs import output_of, pipeline_root, run_path
from llada_ray.train.plan import find_unit
from llada_ray.train.run import run_unit

pytestmark = pytest.mark.integration


def small_config(name: str, root: str, tracking: str, **overrides: object) -> PipelineConfig:
    """The tiny recipe shrunk to seconds per run: every stage kind, two workers."""
    every = {"micro_batch_size": 8, "checkpoint_every_steps": 5, "eval_every_steps": 5,
             "eval_rows": 32, "warmup_steps": 3}  # fmt: skip
    chat = {**every, "block_size": 16, "max_len": 128}
    raw: dict = {
        "name": name,
        "model": {
            "source": "tiny",
            "tiny": {"hidden_size": 64, "num_layers": 2, "intermediate_size": 128},
            "attention_tile": 32,
        },
        "tokenizer": {"source": "train", "vocab_size": 512, "train_chars": 300_000},
        "data": {
            "seq_len": 64,
            "pretrain": [{"type": "task", "examples": 3000}],
            "sft": [{"type": "task", "examples": 600, "seed": 1}],
            "dpo": [{"type": "task", "examples": 300, "seed": 2}],
            "validation_fraction": 0.05,
        },
        "stages": [
            {"stage": "ar_pretrain", "tokens": 40_000, "lr": 3e-3, **every},
            {
                "stage": "cpt",
                **every,
                "keep_top_k": 2,
                "embed_noise": {"steps": 5},
                "phases": [
                    {"name": "b1", "block_size": 1, "tokens": 8_000, "lr": 1e-3},
                    {"name": "b4", "block_size": 4, "tokens": 8_000, "lr": 1e-3},
                    {"name": "stable", "block_size": 64, "tokens": 8_000, "lr": 1e-3},
                    {"name": "b16", "block_size": 16, "tokens": 16_000, "lr": 5e-4},
                ],
            },
            {"stage": "merge", "top_k": 2},
            {"stage": "sft", "lr": 1e-3, "epochs": 0.5, **chat},
            {"stage": "cap", "lr": 5e-4, "epochs": 0.25, **chat},
            {"stage": "dpo", **chat, "micro_batch_size": 4, "epochs": 0.3, "eval_rows": 16},
            {"stage": "ar_sft", "lr": 1e-3, **every},
        ],
        "storage": {"root": root},
        "tracking": {"uri": tracking, "experiment": "train-test"},
        "scaling": {"num_workers": 2},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            raw[section] = {**raw[section], field: value}
        else:
            raw[section] = value
    return PipelineConfig.model_validate(raw)


def _s3_root(s3, prefix: str) -> dict:
    return {"root": f"s3://{s3.bucket}/{prefix}", "endpoint_url": s3.endpoint_url}


def _final_weights(cfg: PipelineConfig, name: str) -> dict[str, torch.Tensor]:
    fs, run_root = pipeline_root(cfg)
    out = output_of(fs, run_root, find_unit(cfg, name))
    assert out is not None, f"{name} has no final checkpoint"
    try:
        return load_file(out.local / "model.safetensors")
    finally:
        out.cleanup()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _train_workers() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_killed_worker_resumes_to_the_same_weights(ray_cluster, mlflow_tracking, tmp_path):
    """SIGKILL a training worker mid-run: Ray Train restarts the group from the last checkpoint
    and the final weights equal an uninterrupted run's bit for bit (no sample skipped or seen
    twice, the same noise draws)."""
    stages = small_config("x", "", "").model_dump()["stages"][:1]
    stages[0] |= {"tokens": 15_000}
    make = lambda root: small_config(  # noqa: E731
        "kill", str(root), mlflow_tracking.uri, stages=stages, scaling__max_failures=1
    )
    clean, killed = make(tmp_path / "clean"), make(tmp_path / "killed")
    unit = find_unit(clean, "ar_pretrain")
    run_unit(clean, unit)

    fs, run_root = pipeline_root(killed)
    runs = run_path(run_root, unit)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            run_unit(killed, unit)
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 300
    while not checkpoint.read_manifests(fs, runs) and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = _train_workers()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not errors, errors
    final = checkpoint.read_manifests(fs, runs)[0][1]
    assert final["final"] and final["resumed_from"] >= 5  # the restarted group resumed
    _assert_same_weights(_final_weights(clean, unit.name), _final_weights(killed, unit.name))


def test_torn_checkpoint_on_s3_is_skipped_and_the_run_redone_from_the_one_before(
    ray_cluster, s3, mlflow_tracking
):
    stages = small_config("x", "", "").model_dump()["stages"][:1]
    cfg = small_config("torn", "", mlflow_tracking.uri, storage=_s3_root(s3, "torn"),
                       stages=stages)  # fmt: skip
    unit = find_unit(cfg, "ar_pretrain")
    run_unit(cfg, unit)
    before = _final_weights(cfg, unit.name)

    fs, run_root = pipeline_root(cfg)
    newest, previous = checkpoint.list_checkpoints(fs, run_path(run_root, unit))[:2]
    key = f"{newest.split('/', 1)[1]}/model.safetensors"
    body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body[: len(body) // 2])  # truncated

    assert output_of(fs, run_root, unit) is None  # the final checkpoint no longer verifies
    found = checkpoint.latest(fs, run_path(run_root, unit))
    assert found is not None and found[0] == previous
    redone = run_unit(cfg, unit)
    assert redone.trained and redone.manifest["resumed_from"] == found[1]["step"]
    _assert_same_weights(before, _final_weights(cfg, unit.name))


@pytest.mark.parametrize(
    "scaling",
    [
        {"strategy": "deepspeed", "zero_stage": 2},
        {"strategy": "fsdp"},
        {"strategy": "fsdp", "fsdp_mixed_precision": True},
    ],
    ids=["deepspeed-zero2", "fsdp", "fsdp-bf16"],
)
def test_sharded_strategy_trains_checkpoints_and_resumes(
    ray_cluster, mlflow_tracking, tmp_path, scaling
):
    stages = small_config("x", "", "").model_dump()["stages"][:1]
    stages[0] |= {"tokens": 12_000}
    cfg = small_config("sharded", str(tmp_path), mlflow_tracking.uri, stages=stages,
                       scaling={"num_workers": 2, **scaling})  # fmt: skip
    if scaling.get("fsdp_mixed_precision"):  # bf16 weights in compute, fp32 master weights
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    unit = find_unit(cfg, "ar_pretrain")
    first = run_unit(cfg, unit)
    assert first.manifest["strategy"] == scaling["strategy"]
    before = _final_weights(cfg, unit.name)
    fs, run_root = pipeline_root(cfg)
    newest = checkpoint.list_checkpoints(fs, run_path(run_root, unit))[0]
    fs.delete_file(f"{newest}/{checkpoint.MANIFEST}")  # as if it died mid-upload of the last
    previous = checkpoint.latest(fs, run_path(run_root, unit))
    assert previous is not None and previous[1]["step"] < first.manifest["step"]

    again = run_unit(cfg, unit)
    assert again.trained and again.manifest["step"] == first.manifest["step"]
    assert again.manifest["resumed_from"] == previous[1]["step"]  # not from scratch
    after = _final_weights(cfg, unit.name)
    for k in before:  # sharded reductions may reorder float sums: equal to rounding
        torch.testing.assert_close(before[k], after[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_resumes_on_another_world_size_to_the_same_weights(
    ray_cluster, mlflow_tracking, tmp_path
):
    """2 FSDP workers → 1 worker accumulating 2 micro-batches (the same global batch) → 2
    again. DCP reshards weights and Adam's moments at load; every step takes the same samples
    with the same noise (draws follow the sample, not the rank), so the final weights are an
    uninterrupted 2-worker run's up to the order of float sums."""
    stages = small_config("x", "", "").model_dump()["stages"][:1]
    stages[0] |= {"tokens": 15_000, "keep_top_k": 10}  # 15 steps; checkpoints 5, 10, 15

    def config(workers: int) -> PipelineConfig:
        stage = stages[0] | {"grad_accumulation": 2 // workers}
        return small_config("reshard", str(tmp_path), mlflow_tracking.uri, stages=[stage],
                            scaling={"num_workers": workers, "strategy": "fsdp"})  # fmt: skip

    two, one = config(2), config(1)
    unit = find_unit(two, "ar_pretrain")
    reference = run_unit(two, unit)
    fs, run_root = pipeline_root(two)
    runs = run_path(run_root, unit)
    written = {m["step"]: (path, m) for path, m in checkpoint.read_manifests(fs, runs)}
    assert sorted(written) == [5, 10, 15]
    optim = {rel.rsplit("/", 1)[-1] for rel in written[5][1]["files"] if "dcp/optim/" in rel}
    assert {"__0_0.distcp", "__1_0.distcp"} <= optim  # each rank wrote its own shard
    before = _final_weights(two, unit.name)

    def rewind_to(step: int) -> None:
        for path, m in checkpoint.read_manifests(fs, runs):
            if m["step"] > step:
                fs.delete_file(f"{path}/{checkpoint.MANIFEST}")

    rewind_to(5)
    on_one = run_unit(one, find_unit(one, unit.name))  # its stage accumulates 2
    assert on_one.manifest["world_size"] == 1 and on_one.manifest["resumed_from"] == 5
    after_one = _final_weights(one, unit.name)
    rewind_to(10)
    on_two = run_unit(two, unit)
    assert on_two.manifest["world_size"] == 2 and on_two.manifest["resumed_from"] == 10
    after_two = _final_weights(two, unit.name)
    for after, run in ((after_one, on_one), (after_two, on_two)):
        assert after.keys() == before.keys()
        for k in before:
            torch.testing.assert_close(after[k], before[k], rtol=1e-4, atol=1e-5, msg=k)
        assert run.manifest["val_loss"] == pytest.approx(reference.manifest["val_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "scaling",
    [{"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}],
    ids=["fsdp", "deepspeed-zero3"],
)
def test_llada2_moe_trains_a_cpt_phase_sharded_and_resumes(
    ray_cluster, mlflow_tracking, tmp_path, scaling
):
    """A LLaDA2-MoE-shaped tiny model (random init, 8 experts in 4 groups, 2 groups per token,
    a shared expert) through one CPT phase on 2 workers, sharded by FSDP or ZeRO-3: its
    validation loss falls, and a resume from the middle (a meta-device build under FSDP) ends
    on the same weights."""
    every = {"micro_batch_size": 8, "checkpoint_every_steps": 5, "eval_every_steps": 5,
             "eval_rows": 32, "warmup_steps": 3, "keep_top_k": 10}  # fmt: skip
    moe = {"family": "llada2_moe", "hidden_size": 64, "num_layers": 2, "intermediate_size": 128}
    cfg = small_config(
        "moe", str(tmp_path), mlflow_tracking.uri,
        model={"source": "tiny", "tiny": moe, "attention_tile": 32},
        stages=[{"stage": "cpt", **every, "phases": [
            {"name": "b4", "block_size": 4, "tokens": 10_000, "lr": 2e-3}]}],
        scaling={"num_workers": 2, **scaling},
    )  # fmt: skip
    unit = find_unit(cfg, "cpt-b4")
    first = run_unit(cfg, unit)
    before = _final_weights(cfg, unit.name)
    assert any(".mlp.experts.7.gate_proj" in k for k in before)  # the routed experts trained
    client = MlflowClient(mlflow_tracking.uri)
    run = client.search_runs(
        [client.get_experiment_by_name("train-test").experiment_id],
        filter_string="tags.`llada_ray.run` = 'cpt-b4'",
        order_by=["attributes.start_time DESC"],
    )[0]
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert max(val, key=lambda m: m.step).value < min(val, key=lambda m: m.step).value

    fs, run_root = pipeline_root(cfg)
    for path, m in checkpoint.read_manifests(fs, run_path(run_root, unit)):
        if m["step"] > 5:
            fs.delete_file(f"{path}/{checkpoint.MANIFEST}")
    again = run_unit(cfg, unit)
    assert again.manifest["resumed_from"] == 5 and again.manifest["step"] == first.manifest["step"]
    after = _final_weights(cfg, unit.name)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-6, msg=k)
