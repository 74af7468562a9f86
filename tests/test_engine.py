"""The static-shape decode engine against the uncompiled recompute reference: the logits of every
step (prefill, a block's steps, a commit riding along, rows leaving), eager and compiled, and
the tokens of whole decodes; after warm-up, no recompilation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from llada_ray.config import TinyModelConfig
from llada_ray.decoding import ARDecoder, BlockDecoder, EngineOptions, Sampling
from llada_ray.decoding.batch import CachedBatch, RecomputeBatch, Request
from llada_ray.decoding.engine import StaticEngine
from llada_ray.model import DiffusionLM, build_tiny_model

B = 4
MAX_LENGTH = 32
LENGTH_BUCKET = 16  # two length buckets, 16 and 32: compiled decodes cross from one to the other
OPTIONS = {mode: EngineOptions(4, LENGTH_BUCKET, mode) for mode in ("off", "on")}


@pytest.fixture(scope="module")
def dlm(tiny_tokenizer) -> DiffusionLM:
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tiny_tokenizer, seed=3)
    with torch.no_grad():  # sharp enough that a forward accepts several tokens (a fresh init is
        hf.get_output_embeddings().weight.mul_(40.0)  # near uniform: one token a forward)
    return DiffusionLM(hf, attention="dense").eval()


@pytest.fixture(scope="module")
def engines(dlm) -> dict[str, StaticEngine]:
    return {mode: StaticEngine(dlm, MAX_LENGTH, options) for mode, options in OPTIONS.items()}


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 200, (n,), generator=gen).tolist() for n in lengths]


def _block_steps(batch, dlm: DiffusionLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a scripted block decode: two steps of a block, its commit riding along the
    next block's first step while a new row joins (with nothing to commit), then a row leaves
    and the rest step again."""
    gen = torch.Generator().manual_seed(1)
    *prompts, joining = prompts
    starts = torch.tensor([len(p) // B * B for p in prompts])
    batch.add([p[: int(s)] for p, s in zip(prompts, starts, strict=True)], B)
    blocks = torch.full((len(prompts), B), dlm.mask_token_id)
    for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
        blocks[r, : len(p) - s] = torch.tensor(p[s:])
    index = starts[:, None] + torch.arange(B)
    # Cloned: on CUDA a compiled step's output is overwritten by the next replay.
    logits = [batch.forward(blocks, index, B, clean=False).clone()]
    filled = torch.rand(blocks.shape, generator=gen) < 0.5
    blocks = torch.where(filled, torch.randint(5, 200, blocks.shape, generator=gen), blocks)
    logits.append(batch.forward(blocks, index, B, clean=False).clone())
    batch.commit(torch.randint(5, 200, blocks.shape, generator=gen), index)
    batch.add([joining], B)  # whole blocks: its first block is all masks
    index = torch.cat([index + B, len(joining) + torch.arange(B)[None]])
    blocks = torch.full((len(index), B), dlm.mask_token_id)
    logits.append(batch.forward(blocks, index, B, clean=False).clone())
    keep = torch.tensor([0, 2, 3])
    batch.select(keep)
    logits.append(batch.forward(blocks[keep], index[keep], B, clean=False).clone())
    return logits


def _ar_steps(batch, prompts: list[list[int]]) -> list[torch.Tensor]:
    batch.add([p[:-1] for p in prompts], 1)
    ids = torch.tensor([[p[-1]] for p in prompts])
    index = torch.tensor([[len(p) - 1] for p in prompts])
    logits = []
    for step in range(3):
        logits.append(batch.forward(ids, index, 1, clean=True, keep=True).clone())
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
            lambda batch: _block_steps(batch, dlm, [*prompts[:3], _prompts((8,), 1)[0]]),
            lambda batch: _ar_steps(batch, prompts),
        ):
            ours = steps(CachedBatch(engines[mode]))
            reference = steps(RecomputeBatch(dlm, 4))
            for a, b in zip(ours, reference, strict=True):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_a_batch_larger_than_the_cache_or_a_context_past_the_model_is_refused(
    dlm, engines, tiny_tokenizer
):
    with pytest.raises(ValueError, match="exceed max_batch 4"):
        CachedBatch(engines["off"]).add([[1]] * 5, B)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        BlockDecoder(dlm, tiny_tokenizer.eos_token_id, B, max_length=10**6)


@pytest.fixture(scope="module")
def compiled(dlm, tiny_tokenizer) -> tuple[BlockDecoder, ARDecoder, int]:
    """Compiled decoders, warmed up, and the number of graphs dynamo holds after warm-up."""
    eos = tiny_tokenizer.eos_token_id
    cached = BlockDecoder(dlm, eos, B, max_length=MAX_LENGTH, engine=OPTIONS["on"])
    ar = ARDecoder(dlm, eos, max_length=MAX_LENGTH, engine=OPTIONS["on"])
    cached.warm_up()
    ar.warm_up()
    return cached, ar, counters["stats"]["unique_graphs"]


def _joining_at(decoder, others: list[Request], request: Request, steps: int) -> list[Request]:
    """Runs `others` for `steps` steps, then `request` joins; returns them all, decoded."""
    run = decoder.open()
    for r in others:
        run.add(r)
    for _ in range(steps):
        run.step()
    run.add(request)
    while run:
        run.step()
    return [*others, request]


@pytest.mark.parametrize("kind", ["block", "ar"])
@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_request_decodes_the_same_alone_or_joining_a_running_batch_at_any_step(
    dlm, tiny_tokenizer, compiled, kind, mode
):
    """Greedy and sampled with a seed: every request's tokens and forwards are those it gets
    alone, whichever step it joins at (and the running requests' are theirs alone too)."""
    eos = tiny_tokenizer.eos_token_id
    if mode == "on":
        decoder = compiled[0] if kind == "block" else compiled[1]
    elif kind == "block":
        decoder = BlockDecoder(dlm, eos, B, max_length=MAX_LENGTH, engine=OPTIONS["off"])
    else:
        decoder = ARDecoder(dlm, eos, max_length=MAX_LENGTH, engine=OPTIONS["off"])
    prompts = _prompts((6, 9, 5), seed=4)
    for sampling in (Sampling(0.6, max_new_tokens=14), Sampling(0.6, 1, 14, temperature=0.9)):
        pairs = list(zip(prompts, [11, 12, 13], strict=True))  # with their seeds
        alone = [decoder.generate([p], sampling, [seed])[0] for p, seed in pairs]
        for steps in range(5):
            requests = [decoder.request(p, sampling, seed) for p, seed in pairs]
            done = _joining_at(decoder, requests[:2], requests[2], steps)
            assert [(r.out.tokens, r.out.forwards) for r in done] == [
                (g.tokens, g.forwards) for g in alone
            ], f"joined after {steps} steps"


def test_a_cancelled_request_leaves_at_the_next_step(dlm, tiny_tokenizer):
    decoder = BlockDecoder(dlm, tiny_tokenizer.eos_token_id, B, max_length=MAX_LENGTH,
                           engine=OPTIONS["off"])  # fmt: skip
    run = decoder.open()
    stays, leaves = (decoder.request(p, Sampling(1.0, max_new_tokens=16)) for p in _prompts((4, 8)))
    run.add(stays)
    run.add(leaves)
    run.step()
    leaves.cancelled = True
    run.step()
    assert run.requests == [stays] and leaves.out.finish_reason == "cancelled"
    assert leaves.out.forwards == B  # τ 1.0: a token per forward, a whole block (no prompt tail)
    assert run.room == 3


def test_the_prefix_cache_restores_shared_pages_exactly_and_stays_in_its_bound(dlm):
    """Prompts sharing 16 tokens (two 8-token pages): the second restores them from the cache
    into another row than the first's, over other data, and its next step's logits are the
    reference's (a restore that wrote nothing, or into the wrong row, changes them); a cache of
    3 pages evicts the least recently used, deepest pages first."""
    page_bytes = 2 * 2 * 2 * 8 * 16 * 4  # K and V × layers × kv heads × page × head dim × fp32
    options = EngineOptions(4, MAX_LENGTH, "off", prefix_cache_mb=3 * page_bytes / 2**20, page=8)
    engine = StaticEngine(dlm, MAX_LENGTH, options)
    assert engine.prefix.stats.capacity_pages == 3
    shared = _prompts((16,), seed=7)[0]
    first, second = shared + _prompts((8,), 8)[0], shared + _prompts((4,), 9)[0]
    other = _prompts((3,), seed=11)[0]  # shares nothing: row 0 of the next batch
    CachedBatch(engine).add([first], B)  # stores its 3 pages, from row 0
    noise = torch.Generator().manual_seed(4)
    for x in (*engine.cache.keys, *engine.cache.values):  # every row holds other data now
        x.copy_(torch.randn(x.shape, generator=noise))
    blocks = torch.randint(5, 200, (2, B), generator=torch.Generator().manual_seed(2))
    index = torch.stack([len(p) // B * B + torch.arange(B) for p in (other, second)])
    logits = []
    for batch, restored in ((CachedBatch(engine), [0, 16]), (RecomputeBatch(dlm, 4), [0, 0])):
        prompts = [other[: len(other) // B * B], second[: len(second) // B * B]]
        assert batch.add(prompts, B) == restored
        logits.append(batch.forward(blocks, index, B, clean=False)[1])
    torch.testing.assert_close(logits[0], logits[1], atol=2e-5, rtol=1e-4)
    stats = engine.prefix.stats
    assert (stats.hit_tokens, stats.computed_tokens, stats.pages) == (16, 24 + 4, 3)
    # Two new pages evict the first prompt's third page, then the shared second one.
    CachedBatch(engine).add(_prompts((16,), seed=10), B)
    assert CachedBatch(engine).add([first], B) == [8]


def test_compiled_decoders_give_the_tokens_of_the_reference_and_never_recompile(
    dlm, tiny_tokenizer, compiled
):
    """Warm-up compiles every shape; decodes of every batch size and prompt length after it
    compile nothing, and give the reference decoder's tokens (greedy, fp32), batched or alone."""
    eos = tiny_tokenizer.eos_token_id
    cached, ar, graphs = compiled
    for lengths, sampling in (
        ((3, 9, 14, 6), Sampling(0.3, max_new_tokens=12)),
        ((5,), Sampling(0.9, max_new_tokens=16)),
        ((2, 11), Sampling(1.0, max_new_tokens=9)),
    ):
        prompts = _prompts(lengths, seed=len(lengths))
        reference = BlockDecoder(dlm, eos, B, use_cache=False).generate(prompts, sampling)
        out = cached.generate(prompts, sampling)
        assert [(g.tokens, g.forwards) for g in out] == [(g.tokens, g.forwards) for g in reference]
        # A decode that starts in the 16-key bucket and ends in the 32-key one.
        assert any(len(p) < LENGTH_BUCKET < len(p) + len(g.tokens)
                   for p, g in zip(prompts, out, strict=True))  # fmt: skip
        if sampling.threshold < 0.5:  # the compiled steps accepted several tokens a forward
            assert max(g.tokens_per_forward for g in out) > 1.5
        alone = [cached.generate([p], sampling)[0].tokens for p in prompts]
        assert alone == [g.tokens for g in reference]
        greedy = Sampling(max_new_tokens=8)
        ar_reference = ARDecoder(dlm, eos, use_cache=False).generate(prompts, greedy)
        assert [g.tokens for g in ar.generate(prompts, greedy)] == [g.tokens for g in ar_reference]
    assert counters["stats"]["unique_graphs"] == graphs
