"""Untrusted files are never unpickled: models load from safetensors only, and the one torch.load
(our own optimizer state) is weights_only. Credentials in logs and manifests:
tests/test_pipeline.py; the Serve API key: tests/test_serve.py."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest

from llada_ray.config import TinyModelConfig
from llada_ray.model import build_tiny_model, load_model

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
    calls = _calls("torch.load")
    assert calls  # the optimizer state: if it moves, this test must follow it
    for path, call in calls:
        assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"
    assert not _calls("pickle.load") and not _calls("pickle.loads")


def test_models_load_from_safetensors_only():
    calls = [(p, c) for p, c in _calls(".from_pretrained") if "Model" in ast.unparse(c.func)]
    assert calls
    for path, call in calls:
        assert _keyword(call, "use_safetensors") is True, f"{path}:{call.lineno}"
