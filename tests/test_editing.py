"""Token editing (LLaDA2.1) at decode time, against an independent slow reference: the training
layout recomputed from scratch at every forward, one request, no cache."""

from __future__ import annotations

import itertools

import pytest
import torch

from llada_ray.config import TinyModelConfig
from llada_ray.decoding import BlockDecoder, EngineOptions, Sampling
from llada_ray.model import DiffusionLM, build_tiny_model
from llada_ray.model.adapter import block_diffusion_inputs

B = 8


@pytest.fixture(scope="module")
def dlm(tiny_tokenizer) -> DiffusionLM:
    """A random model whose output head is its own (tied to the input embeddings, a random
    model predicts the token it reads, so it never edits), sharp enough for confidences to
    spread over (0, 1), and made to predict EOS at some positions, so answers end."""
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tiny_tokenizer, seed=11)
    head = hf.get_output_embeddings()
    draw = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(5))
    head.weight = torch.nn.Parameter(draw * 0.5)
    model = DiffusionLM(hf, attention="dense").eval()
    eos = tiny_tokenizer.eos_token_id

    def ends(module, args, kwargs, logits):
        positions = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        logits[..., eos] += 6.0 * (positions[:, : logits.shape[1]] % 13 == 11)
        return logits

    model.register_forward_hook(ends, with_kwargs=True)
    return model


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(5, 250, (n,), generator=gen).tolist() for n in (3, 8, 13, 21, 30)]


def _positions(
    window: list[int], given: int, budget: int, eos: int, mask: int
) -> tuple[list[int], list[int], bool]:
    """(masked positions that reach the output, decided ones that do, whether it ends here)."""
    end = min(len(window), given + budget)
    eos_at = next((i for i in range(given, len(window)) if window[i] == eos), None)
    if eos_at is not None:
        end = min(end, eos_at + 1)
    opened = [i for i in range(end) if window[i] == mask]
    decided = [i for i in range(given, end) if window[i] != mask]
    return opened, decided, eos_at is not None or given + budget <= len(window)


def _reference(
    dlm: DiffusionLM,
    prompt: list[int],
    eos: int,
    s: Sampling,
    multi_block: bool,
) -> tuple[list[int], int, int, list[int]]:
    """(tokens, forwards, edits, edit-only forwards per block) of greedy joint-threshold
    decoding. Every forward recomputes [xt ; x0] of the training layout: the context, then the
    window (the previous block, not final yet, when `multi_block`; then the current block) as
    the noisy half, so a block with no mask is read as the T2T stream trains it. Per forward:
    every open mask above τ_mask (else the most confident), and every decided answer token of
    the window whose prediction differs with probability above τ_edit. A window is done when
    no mask is open and an edit-only forward changed nothing, or after the cap of those;
    multi-block, when no mask is open and the last forward left the previous block as it was,
    and only where the answer ends there also an edit-only forward that changed nothing."""
    mask = dlm.mask_token_id
    start = len(prompt) // B * B
    context, prev = prompt[:start], None
    block = prompt[start:] + [mask] * (B - len(prompt) + start)
    new: list[int] = []
    forwards = edits = 0
    post_counts: list[int] = []
    while True:
        window = (prev or []) + block
        first = len(context)
        given = max(0, len(prompt) - first)
        budget = s.max_new_tokens - len(new)
        post, quiet, prev_ok = 0, False, prev is None
        while True:
            opened, decided, ends = _positions(window, given, budget, eos, mask)
            checked = prev_ok and (quiet or (multi_block and not ends))
            if not opened and (checked or post >= s.max_post_edit_steps):
                break
            x = torch.tensor([context + window])
            positions = torch.arange(x.shape[1])[None]
            with torch.no_grad():
                logits = dlm(**block_diffusion_inputs(x, x, torch.zeros_like(x), positions, B))
            logits = logits[0, first:]
            forwards += 1
            logits[:, mask] = float("-inf")
            confidence, candidates = logits.float().softmax(-1).max(-1)
            chosen = [i for i in opened if confidence[i] > s.threshold]
            if opened and not chosen:
                chosen = [max(opened, key=lambda i: float(confidence[i]))]
            edit = [i for i in decided if int(candidates[i]) != window[i]
                    and confidence[i] > s.edit_threshold]  # fmt: skip
            if not opened:
                post, quiet = post + 1, not edit
            if prev is not None:
                prev_ok = not any(i < B for i in edit)
            for i in chosen + edit:
                window[i] = int(candidates[i])
            edits += len(edit)
        post_counts.append(post)
        if ends:
            produced = window[given:][:budget]
            if eos in produced:
                produced = produced[: produced.index(eos) + 1]
            return new + produced, forwards, edits, post_counts
        final = len(window) - B if multi_block else len(window)
        new += window[given:final]
        context += window[:final]
        prev = window[final:] if multi_block else None
        block = [mask] * B


SETTINGS = [
    Sampling(threshold=0.5, edit_threshold=0.5, max_new_tokens=40),
    Sampling(threshold=0.9, edit_threshold=0.3, max_new_tokens=40, max_post_edit_steps=2),
    Sampling(threshold=0.3, edit_threshold=0.7, max_new_tokens=40, max_post_edit_steps=0),
]


@pytest.mark.parametrize("multi_block", [False, True])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_cached_edit_decode_equals_the_uncached_reference(dlm, tiny_tokenizer, multi_block,
                                                          setting):  # fmt: skip
    eos, s = tiny_tokenizer.eos_token_id, SETTINGS[setting]
    expected = [_reference(dlm, p, eos, s, multi_block) for p in _prompts()]
    for use_cache in (True, False):
        out = BlockDecoder(dlm, eos, B, use_cache, multi_block_edit=multi_block).generate(
            _prompts(), s
        )
        got = [(g.tokens, g.forwards, g.edits, g.post_edit_forwards) for g in out]
        assert got == [tuple(e) for e in expected]
    # The test bites: tokens are edited, answers end early and run to the budget, and edit-only
    # forwards both confirm at once and go on editing (multi-block, a block the next one checks
    # needs none of its own).
    assert sum(e[2] for e in expected) > 0
    assert {len(e[0]) < s.max_new_tokens for e in expected} == {True, False}
    if s.max_post_edit_steps:
        post = [n for e in expected for n in e[3]]
        assert max(post) > 1 and min(post) == (0 if multi_block else 1)


@pytest.mark.parametrize("multi_block", [False, True])
def test_edit_results_depend_on_neither_batch_nor_admission_time(dlm, tiny_tokenizer,
                                                                 multi_block):  # fmt: skip
    """Mixed rows (editing at two settings, and none) in one batch, and in a batch of two that
    admits the others as rows free up, give what each gives alone."""
    eos = tiny_tokenizer.eos_token_id
    samplings = [SETTINGS[0], Sampling(threshold=0.5, max_new_tokens=40), SETTINGS[1],
                 SETTINGS[0], SETTINGS[2]]  # fmt: skip
    decoder = BlockDecoder(dlm, eos, B, multi_block_edit=multi_block)
    alone = [decoder.generate([p], [s])[0] for p, s in zip(_prompts(), samplings, strict=True)]
    together = decoder.generate(_prompts(), samplings)
    small = BlockDecoder(dlm, eos, B, engine=EngineOptions(max_batch=2),
                         multi_block_edit=multi_block)  # fmt: skip
    admitted = small.generate(_prompts(), samplings)
    for batch in (together, admitted):
        assert [(g.tokens, g.forwards, g.edits) for g in batch] == [
            (g.tokens, g.forwards, g.edits) for g in alone
        ]
    assert sum(g.edits for g in alone) > 0


@pytest.mark.parametrize("multi_block", [False, True])
def test_a_streamed_block_never_changes(dlm, tiny_tokenizer, multi_block):
    """What a stream has shown of an answer stays its start, though edits revise blocks after
    their last mask (and, multi-block, after the next block has begun)."""
    eos = tiny_tokenizer.eos_token_id
    decoder = BlockDecoder(dlm, eos, B, multi_block_edit=multi_block)
    shown: list[list[list[int]]] = [[] for _ in _prompts()]
    for step in decoder.stream(_prompts(), SETTINGS[0]):
        for seen, g in zip(shown, step, strict=True):
            seen.append(list(g.tokens))
    for seen in shown:
        for earlier, later in itertools.pairwise(seen):
            assert later[: len(earlier)] == earlier
    finals = [seen[-1] for seen in shown]
    assert finals == [_reference(dlm, p, eos, SETTINGS[0], multi_block)[0] for p in _prompts()]
    assert any(len(set(map(len, seen))) > 2 for seen in shown)  # answers grew over blocks
