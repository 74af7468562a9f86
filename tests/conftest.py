"""Shared fixtures. The real local stack (Ray, S3, MLflow on loopback) lives in tests/stack.py."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from llada_ray.model import train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token BPE trained on a slice of the standard library: local, deterministic."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text() for p in sorted(stdlib.glob("*.py"))[:30]]
    return train_tokenizer(texts, vocab_size=512)
