"""Top-k merge: k identical checkpoints give the checkpoint; two give their mean, whether the
weights come from an HF directory or from a training checkpoint's DCP shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from llada_ray.config import TinyModelConfig
from llada_ray.model import DiffusionLM, build_tiny_model, load_model
from llada_ray.model.io import save_weights
from llada_ray.model.merge import HFWeights, merge_checkpoints
from llada_ray.train import checkpoint, shards

SMALL = TinyModelConfig(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64
)


def saved(tokenizer, path: Path, seed: int, shard: str | None = None) -> dict:
    model = build_tiny_model(SMALL, tokenizer, seed=seed)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_merge_identical_is_identity_and_two_is_mean(
    tmp_path: Path, tiny_tokenizer, shard: str | None
) -> None:
    a = tmp_path / "a"
    saved(tiny_tokenizer, a, seed=1, shard=shard)
    assert (a / "model.safetensors.index.json").exists() == (shard is not None)
    merge_checkpoints([HFWeights(a)] * 3, a, tmp_path / "same")
    original, same = weights(a), weights(tmp_path / "same")
    assert same.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(same[name], tensor, rtol=0, atol=1e-7)

    b = tmp_path / "b"
    saved(tiny_tokenizer, b, seed=2, shard=shard)
    merge_checkpoints([HFWeights(a), HFWeights(b)], a, tmp_path / "mean")
    wa, wb, mean = weights(a), weights(b), weights(tmp_path / "mean")
    for name in wa:
        torch.testing.assert_close(mean[name], (wa[name] + wb[name]) / 2)
    model, tokenizer = load_model(tmp_path / "mean")  # a loadable HF checkpoint
    assert tokenizer.mask_token_id == model.config.mask_token_id


def test_merge_refuses_different_architectures(tmp_path: Path, tiny_tokenizer) -> None:
    saved(tiny_tokenizer, tmp_path / "a", seed=1)
    other = build_tiny_model(SMALL.model_copy(update={"num_layers": 1}), tiny_tokenizer)
    other.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="does not have the same tensors"):
        merge_checkpoints([HFWeights(tmp_path / "b")], tmp_path / "a", tmp_path / "out")


def test_merge_reads_dcp_shards_of_a_training_checkpoint(tmp_path: Path, tiny_tokenizer) -> None:
    """A checkpoint before a run's end has no HF export: its weights come from the DCP model
    shards (which keep the tied head twice), and the mean equals the HF-only mean."""
    a = tmp_path / "a"
    wa = saved(tiny_tokenizer, a, seed=1)
    b = build_tiny_model(SMALL, tiny_tokenizer, seed=2)
    ckpt = tmp_path / "ckpt"
    shards.save(DiffusionLM(b).state_dict(), ckpt / checkpoint.DCP_MODEL)
    checkpoint.write_manifest(ckpt, checkpoint.describe_files(ckpt), {"step": 5})
    fs = pafs.LocalFileSystem()
    reader = shards.ShardReader(
        fs, str(ckpt), checkpoint.committed(fs, str(ckpt)), checkpoint.DCP_MODEL
    )
    merge_checkpoints([HFWeights(a), shards.DcpWeights(reader)], a, tmp_path / "mean")
    mean, wb = weights(tmp_path / "mean"), b.state_dict()
    assert mean.keys() == weights(a).keys()
    for name in mean:
        torch.testing.assert_close(mean[name], (wa[name] + wb[name]) / 2)


@pytest.mark.parametrize("shard_bytes", [1 << 30, 40_000])
def test_weights_written_a_shard_at_a_time_load_back(
    tmp_path: Path, tiny_tokenizer, shard_bytes: int
) -> None:
    """A run's HF export streams tensors into safetensors shards (one file when it fits): HF
    loads it back to the same model."""
    model = build_tiny_model(SMALL, tiny_tokenizer, seed=3)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_weights(iter(state.items()), tmp_path, shard_bytes)
    model.config.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard_bytes > 1 << 20:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    loaded, _ = load_model(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
