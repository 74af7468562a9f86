"""The HF model under our layouts, against HF's own forward and per-block recomputation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llada_ray.config import TinyModelConfig
from llada_ray.diffusion.masks import position_ids_for
from llada_ray.model import (
    DiffusionLM,
    build_tiny_model,
    embedding_rms,
    ensure_mask_token,
    load_model,
    save_model,
)
from llada_ray.model.adapter import block_diffusion_inputs, causal_inputs, stable_inputs

FAMILIES = ["llama", "qwen2", "qwen3"]


def tiny_pair(tokenizer: PreTrainedTokenizerFast, family: str, attention: str = "block_sparse"):
    """(plain HF model with SDPA, DiffusionLM over an identical copy)."""
    hf = build_tiny_model(
        TinyModelConfig(family=family, hidden_size=64, num_layers=2, intermediate_size=128),
        tokenizer,
        seed=7,
    ).eval()
    return hf, DiffusionLM(copy.deepcopy(hf), attention=attention, tile_size=16).eval()


def hf_logits_with_mask(hf, ids: torch.Tensor, positions: torch.Tensor, allow: torch.Tensor):
    """HF's own SDPA forward under an explicit 4D boolean mask (True = may attend)."""
    return hf(input_ids=ids, position_ids=positions, attention_mask=allow[None, None]).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_mode_reproduces_hf_logits(tiny_tokenizer, family: str) -> None:
    hf, dlm = tiny_pair(tiny_tokenizer, family)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 48))
    docs = torch.zeros_like(ids)
    with torch.no_grad():
        ours = dlm(**causal_inputs(ids, docs, position_ids_for(docs, True)))
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_separate_runs(tiny_tokenizer, family: str) -> None:
    hf, dlm = tiny_pair(tiny_tokenizer, family)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 40))
    docs = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7])
    with torch.no_grad():
        ours = dlm(**causal_inputs(ids, docs, position_ids_for(docs, True)))
        for lo, hi in [(0, 13), (13, 33), (33, 40)]:
            theirs = hf(input_ids=ids[:, lo:hi]).logits
            torch.testing.assert_close(ours[:, lo:hi], theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["block_sparse", "dense", "eager"])
def test_bd_block_logits_equal_recomputation_from_clean_prefix(
    tiny_tokenizer, family: str, attention: str
) -> None:
    """Logits of noisy block k = a fresh forward of [clean blocks < k ; noisy block k] alone."""
    hf, dlm = tiny_pair(tiny_tokenizer, family, attention)
    block, n = 8, 32
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(5, len(tiny_tokenizer), (1, n), generator=gen)
    xt = torch.where(torch.rand(1, n, generator=gen) < 0.5, dlm.mask_token_id, x0)
    docs = torch.zeros_like(x0)
    positions = position_ids_for(docs, False)
    with torch.no_grad():
        ours = dlm(**block_diffusion_inputs(xt, x0, docs, positions, block))
        for k in range(n // block):
            lo, hi = k * block, (k + 1) * block
            ids = torch.cat([x0[:, :lo], xt[:, lo:hi]], 1)
            # clean prefix block-causal; the noisy block sees the prefix and itself
            blk = torch.arange(hi) // block
            allow = blk[None, :] <= blk[:, None]
            theirs = hf_logits_with_mask(hf, ids, torch.arange(hi)[None], allow)
            torch.testing.assert_close(ours[:, lo:hi], theirs[:, lo:hi], atol=1e-5, rtol=1e-5)


def test_stable_mode_is_bidirectional_per_document(tiny_tokenizer) -> None:
    hf, dlm = tiny_pair(tiny_tokenizer, "qwen3")
    ids = torch.randint(0, len(tiny_tokenizer), (1, 24))
    docs = torch.tensor([[0] * 10 + [1] * 14])
    with torch.no_grad():
        ours = dlm(**stable_inputs(ids, docs, position_ids_for(docs, True)))
        for lo, hi in [(0, 10), (10, 24)]:
            full = torch.ones(hi - lo, hi - lo, dtype=torch.bool)
            theirs = hf_logits_with_mask(hf, ids[:, lo:hi], torch.arange(hi - lo)[None], full)
            torch.testing.assert_close(ours[:, lo:hi], theirs, atol=1e-5, rtol=1e-5)


def test_embedding_noise_touches_only_mask_positions(tiny_tokenizer) -> None:
    _, dlm = tiny_pair(tiny_tokenizer, "qwen3")
    ids = torch.randint(5, len(tiny_tokenizer), (1, 16))
    docs = torch.zeros_like(ids)
    pos = position_ids_for(docs, True)
    sigma = embedding_rms(dlm.hf)
    with torch.no_grad():
        clean = dlm(**stable_inputs(ids, docs, pos))
        torch.testing.assert_close(
            dlm(**stable_inputs(ids, docs, pos), embed_noise_std=sigma), clean
        )
        ids[0, 5] = dlm.mask_token_id
        base = dlm(**stable_inputs(ids, docs, pos))
        noisy = dlm(**stable_inputs(ids, docs, pos), embed_noise_std=sigma)
    assert not torch.allclose(noisy, base)


def test_mask_token_added_when_missing(tmp_path: Path, tiny_tokenizer) -> None:
    # A tokenizer without mask (and without pad) token, as most AR tokenizers are.
    tiny_tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path, mask_token=None, pad_token=None)
    assert plain.mask_token is None
    model = build_tiny_model(
        TinyModelConfig(
            hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
        ),
        plain,
    )
    plain.add_special_tokens({"additional_special_tokens": ["<|x|>"]})  # tokenizer outgrows model
    rows = model.get_input_embeddings().weight.shape[0]
    mask_id = ensure_mask_token(model, plain, "<|newmask|>")
    assert plain.convert_ids_to_tokens(mask_id) == "<|newmask|>"
    assert model.get_input_embeddings().weight.shape[0] == len(plain) > rows
    assert plain.pad_token_id == plain.eos_token_id != mask_id
    assert model.config.mask_token_id == mask_id


def test_embeddings_never_shrink(tiny_tokenizer) -> None:
    model = build_tiny_model(
        TinyModelConfig(
            hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
        ),
        tiny_tokenizer,
    )
    model.resize_token_embeddings(len(tiny_tokenizer) + 64)  # padded vocab, as Qwen ships
    ensure_mask_token(model, tiny_tokenizer, "<|mask|>")
    assert model.get_input_embeddings().weight.shape[0] == len(tiny_tokenizer) + 64


def test_save_load_round_trip(tmp_path: Path, tiny_tokenizer) -> None:
    _, dlm = tiny_pair(tiny_tokenizer, "qwen3")
    save_model(dlm.hf, tiny_tokenizer, tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    model, tokenizer = load_model(tmp_path)
    again = DiffusionLM(model, attention="block_sparse", tile_size=16).eval()
    assert again.mask_token_id == dlm.mask_token_id == tokenizer.mask_token_id
    ids = torch.randint(0, len(tokenizer), (1, 16))
    docs = torch.zeros_like(ids)
    pos = position_ids_for(docs, True)
    with torch.no_grad():
        torch.testing.assert_close(
            again(**stable_inputs(ids, docs, pos)), dlm(**stable_inputs(ids, docs, pos))
        )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "2+2"}], tokenize=False)
