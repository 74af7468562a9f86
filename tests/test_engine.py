"""The static-shape decode engine against the uncompiled recompute reference: the logits of every
step (prefill, a block's steps, a commit riding along, rows leaving), eager and compiled, and
the tokens of whole decodes; after warm-up, no recompilation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from llada_ray.config import TinyModelConfig
from llada_ray.decoding import ARDecoder, BlockDecoder, EngineOptions, Sampling
from llada_ray.decoding.batch import CachedBatch, RecomputeBatch
from llada_ray.decoding.engine import StaticEngine
from llada_ray.model import DiffusionLM, build_tiny_model

B = 4
MAX_LENGTH = 32  # one length bucket: few graphs to compile
OPTIONS = {mode: EngineOptions(4, MAX_LENGTH, mode) for mode in ("off", "on")}


@pytest.fixture(scope="module")
def dlm(tiny_tokenizer) -> DiffusionLM:
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tiny_tokenizer, seed=3)
    return DiffusionLM(hf, attention="dense").eval()


@pytest.fixture(scope="module")
def engines(dlm) -> dict[str, StaticEngine]:
    return {mode: StaticEngine(dlm, MAX_LENGTH, options) for mode, options in OPTIONS.items()}


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 200, (n,), generator=gen).tolist() for n in lengths]


def _block_steps(batch, dlm: DiffusionLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a scripted block decode: two steps of a block, its commit riding along the
    next block's first step, then a row leaves and the rest step again."""
    gen = torch.Generator().manual_seed(1)
    starts = torch.tensor([len(p) // B * B for p in prompts])
    batch.prefill([p[: int(s)] for p, s in zip(prompts, starts, strict=True)], B)
    blocks = torch.full((len(prompts), B), dlm.mask_token_id)
    for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
        blocks[r, : len(p) - s] = torch.tensor(p[s:])
    index = starts[:, None] + torch.arange(B)
    logits = [batch.forward(blocks, index, B, clean=False)]
    filled = torch.rand(blocks.shape, generator=gen) < 0.5
    blocks = torch.where(filled, torch.randint(5, 200, blocks.shape, generator=gen), blocks)
    logits.append(batch.forward(blocks, index, B, clean=False))
    batch.commit(torch.randint(5, 200, blocks.shape, generator=gen), index)
    index = index + B
    blocks = torch.full_like(blocks, dlm.mask_token_id)
    logits.append(batch.forward(blocks, index, B, clean=False))
    keep = torch.tensor([0, 2, 3])
    batch.select(keep)
    logits.append(batch.forward(blocks[keep], index[keep], B, clean=False))
    return logits


def _ar_steps(batch, prompts: list[list[int]]) -> list[torch.Tensor]:
    batch.prefill([p[:-1] for p in prompts], 1)
    ids = torch.tensor([[p[-1]] for p in prompts])
    index = torch.tensor([[len(p) - 1] for p in prompts])
    logits = []
    for step in range(3):
        logits.append(batch.forward(ids, index, 1, clean=True, keep=True))
        ids, index = logits[-1].argmax(-1), index + 1
        if step == 1:  # the second row leaves
            keep = torch.tensor([0, 2, 3])
            batch.select(keep)
            ids, index = ids[keep], index[keep]
    return logits


@pytest.mark.parametrize("mode", ["off", "on"])
def test_engine_steps_give_the_logits_of_recomputing(dlm, engines, mode):
    prompts = _prompts((3, 9, 14, 6))
    with torch.no_grad():
        for steps in (
            lambda batch: _block_steps(batch, dlm, prompts),
            lambda batch: _ar_steps(batch, prompts),
        ):
            ours = steps(CachedBatch(engines[mode], len(prompts)))
            reference = steps(RecomputeBatch(dlm, len(prompts)))
            for a, b in zip(ours, reference, strict=True):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_a_batch_larger_than_the_cache_or_a_context_past_the_model_is_refused(
    dlm, engines, tiny_tokenizer
):
    with pytest.raises(ValueError, match="exceeds max_batch 4"):
        CachedBatch(engines["off"], 5)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        BlockDecoder(dlm, tiny_tokenizer.eos_token_id, B, max_length=10**6)


def test_compiled_decoders_give_the_tokens_of_the_reference_and_never_recompile(
    dlm, tiny_tokenizer
):
    """Warm-up compiles every shape; decodes of every batch size and prompt length after it
    compile nothing, and give the reference decoder's tokens (greedy, fp32), batched or alone."""
    eos = tiny_tokenizer.eos_token_id
    cached = BlockDecoder(dlm, eos, B, max_length=MAX_LENGTH, engine=OPTIONS["on"])
    ar = ARDecoder(dlm, eos, max_length=MAX_LENGTH, engine=OPTIONS["on"])
    cached.warm_up()
    ar.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    for lengths, sampling in (
        ((3, 9, 14, 6), Sampling(0.3, max_new_tokens=12)),
        ((5,), Sampling(0.9, max_new_tokens=16)),
        ((2, 11), Sampling(1.0, max_new_tokens=9)),
    ):
        prompts = _prompts(lengths, seed=len(lengths))
        reference = BlockDecoder(dlm, eos, B, use_cache=False).generate(prompts, sampling)
        out = cached.generate(prompts, sampling)
        assert [(g.tokens, g.forwards) for g in out] == [(g.tokens, g.forwards) for g in reference]
        alone = [cached.generate([p], sampling)[0].tokens for p in prompts]
        assert alone == [g.tokens for g in reference]
        greedy = Sampling(max_new_tokens=8)
        ar_reference = ARDecoder(dlm, eos, use_cache=False).generate(prompts, greedy)
        assert [g.tokens for g in ar.generate(prompts, greedy)] == [g.tokens for g in ar_reference]
    assert counters["stats"]["unique_graphs"] == graphs
