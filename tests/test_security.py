"""Untrusted files are never unpickled: models load from safetensors only, any torch.load is
weights_only, and a checkpoint's DCP metadata (a pickle) yields only DCP's own classes.
Credentials in logs and manifests: tests/test_pipeline.py; the Serve API key:
tests/test_serve.py."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch.distributed.checkpoint import CheckpointException

from llada_ray.config import TinyModelConfig
from llada_ray.model import build_tiny_model, load_model
from llada_ray.train import checkpoint, shards

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("llada_ray", "jobs", "tools") for p in (REPO / d).rglob("*.py"))


class _Exploit:
    """Unpickling this runs a shell command: proof that something unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_model_is_refused_and_never_unpickled(tiny_tokenizer, tmp_path):
    directory = tmp_path / "model"
    hf = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, intermediate_size=64),
                          tiny_tokenizer)  # fmt: skip
    hf.config.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    marker = tmp_path / "pwned"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(OSError, match="safetensors"):
        load_model(directory)
    assert not marker.exists()


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                found.append((path, node))
    return found


def _keyword(call: ast.Call, name: str) -> object:
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), None)


def test_torch_load_only_with_weights_only():
    for path, call in _calls("torch.load"):  # none today: trainer state loads through DCP
        assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"
    assert not _calls("pickle.load") and not _calls("pickle.loads")


def test_checkpoint_metadata_unpickles_only_dcp_classes(tmp_path):
    """DCP's `.metadata` is a pickle. A checkpoint whose metadata carries code (its manifest
    forged to match) is refused, and the code never runs; a real one still loads."""
    ckpt = tmp_path / "checkpoint_00000005"
    real = {"w": torch.arange(6.0).reshape(2, 3)}
    shards.save(real, ckpt / checkpoint.DCP_MODEL)
    fs = pafs.LocalFileSystem()
    checkpoint.write_manifest(ckpt, checkpoint.describe_files(ckpt), {"step": 5})
    reader = shards.ShardReader(fs, str(ckpt), checkpoint.committed(fs, str(ckpt)), "dcp/model")
    loaded = {"w": torch.zeros(2, 3)}
    shards.load(loaded, reader)
    assert torch.equal(loaded["w"], real["w"])

    marker = tmp_path / "pwned"
    (ckpt / checkpoint.DCP_MODEL / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    checkpoint.write_manifest(ckpt, checkpoint.describe_files(ckpt), {"step": 5})
    reader = shards.ShardReader(fs, str(ckpt), checkpoint.committed(fs, str(ckpt)), "dcp/model")
    with pytest.raises(pickle.UnpicklingError, match=r"may not hold posix\.system"):
        reader.read_metadata()
    with pytest.raises(CheckpointException):  # DCP's wrapper around the refusal above
        shards.load(loaded, reader)
    assert not marker.exists()


def test_models_load_from_safetensors_only():
    calls = [(p, c) for p, c in _calls(".from_pretrained") if "Model" in ast.unparse(c.func)]
    assert calls
    for path, call in calls:
        assert _keyword(call, "use_safetensors") is True, f"{path}:{call.lineno}"
