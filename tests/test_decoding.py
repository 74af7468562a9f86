"""Decoding against independent references: no cache, one request at a time, a brute-force
sampler built on the training layout, and Hugging Face `generate()` for the AR baseline."""

from __future__ import annotations

import copy

import pytest
import torch

from llada_ray.config import TinyModelConfig
from llada_ray.decoding import ARDecoder, BlockDecoder, Sampling
from llada_ray.decoding.sampling import choose
from llada_ray.model import DiffusionLM, build_tiny_model
from llada_ray.model.adapter import block_diffusion_inputs

B = 8


@pytest.fixture(scope="module")
def dlm(tiny_tokenizer) -> DiffusionLM:
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tiny_tokenizer, seed=7)
    with torch.no_grad():  # sharper distributions than a fresh init: confidences spread out
        hf.get_output_embeddings().weight.mul_(12.0)
    return DiffusionLM(hf, attention="dense").eval()


@pytest.fixture(scope="module")
def eos_dlm(tiny_tokenizer) -> DiffusionLM:
    """The model above, made to predict EOS at some absolute positions (a random model never
    ends an answer): decisions past an answer's end happen, and rules about them bite."""
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tiny_tokenizer, seed=7)
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(12.0)
    model = DiffusionLM(hf, attention="dense").eval()
    eos = tiny_tokenizer.eos_token_id

    def ends(module, args, kwargs, logits):
        positions = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        positions = positions[:, : logits.shape[1]]
        logits[..., eos] += 8.0 * ((positions % 7 == 4) | (positions % 11 == 9))
        return logits

    model.register_forward_hook(ends, with_kwargs=True)
    return model


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(5, 500, (n,), generator=gen).tolist() for n in (3, 8, 13, 21)]


@pytest.mark.parametrize("threshold", [0.05, 0.5])
def test_cache_gives_the_tokens_of_no_cache(dlm, tiny_tokenizer, threshold):
    eos = tiny_tokenizer.eos_token_id
    sampling = Sampling(threshold=threshold, max_new_tokens=30)
    cached = BlockDecoder(dlm, eos, B).generate(_prompts(), sampling)
    plain = BlockDecoder(dlm, eos, B, use_cache=False).generate(_prompts(), sampling)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    if threshold < 0.1:  # this model is that sure: whole blocks in one step
        assert all(g.tokens_per_forward > 2 for g in cached)


def test_batched_equals_one_request_at_a_time(dlm, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    sampling = Sampling(threshold=0.05, max_new_tokens=30)
    decoder = BlockDecoder(dlm, eos, B)
    batched = decoder.generate(_prompts(), sampling)
    alone = [decoder.generate([p], sampling)[0] for p in _prompts()]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert [g.forwards for g in batched] == [g.forwards for g in alone]


def _reference(
    dlm: DiffusionLM,
    prompt: list[int],
    eos: int,
    max_new: int,
    threshold: float = 1.0,
    order: str = "confidence",
    eos_in_order: bool = False,
) -> tuple[list[int], int, int]:
    """(tokens, forwards, tokens decided past the output's EOS) of greedy block decoding,
    recomputed from scratch at every step with the training layout [xt ; x0] (noisy block, clean
    context), no cache, one request. A step accepts every open position above τ, else the most
    confident one (left to right: the leftmost open one alone; EOS in order: none after the
    first open position predicting EOS, which itself only once nothing open precedes it unchosen,
    else the leftmost); a position is open while masked, within the token budget and not after
    the first generated EOS."""
    seq, mask = list(prompt), dlm.mask_token_id
    new: list[int] = []
    forwards = 0
    while True:
        start = len(seq) // B * B
        given = len(seq) - start
        block = seq[start:] + [mask] * (B - given)

        while opened := _open_positions(block, given, max_new - len(new), eos, mask):
            x = torch.tensor([seq[:start] + block])
            doc = torch.zeros_like(x)
            pos = torch.arange(x.shape[1])[None]
            with torch.no_grad():
                logits = dlm(**block_diffusion_inputs(x, x, doc, pos, B))[0, start:]
            forwards += 1
            logits[:, mask] = float("-inf")
            confidence, candidates = logits.float().softmax(-1).max(-1)
            chosen = [i for i in opened if confidence[i] > threshold]
            chosen = chosen or [max(opened, key=lambda i: float(confidence[i]))]
            if eos_in_order:
                end = min((i for i in opened if int(candidates[i]) == eos), default=B)
                chosen = [i for i in chosen if i <= end]
                if end in chosen and any(i < end and i not in chosen for i in opened):
                    chosen.remove(end)
                chosen = chosen or [min(opened)]
            if order == "left_to_right":
                chosen = [min(opened)]
            for i in chosen:
                block[i] = int(candidates[i])
        produced = block[given:][: max_new - len(new)]
        if eos in produced:
            end = produced.index(eos) + 1
            return new + produced[:end], forwards, sum(t != mask for t in produced[end:])
        new += produced
        seq = seq[:start] + block
        if len(new) >= max_new:
            return new, forwards, 0


def _open_positions(block: list[int], given: int, budget: int, eos: int, mask: int) -> list[int]:
    """Masked positions before the budget's end and up to the first generated EOS."""
    end = min(B, given + budget)
    eos_at = next((i for i in range(given, B) if block[i] == eos), None)
    if eos_at is not None:
        end = min(end, eos_at + 1)
    return [i for i in range(end) if block[i] == mask]


@pytest.mark.parametrize("threshold", [1.0, 0.3])
def test_block_decoder_equals_a_brute_force_sampler(dlm, tiny_tokenizer, threshold):
    """Accepts limited to positions that reach the output, cached and batched, give the tokens
    and the forward count of the brute-force reference."""
    eos = tiny_tokenizer.eos_token_id
    prompts = [*_prompts(), [*_prompts()[1][:5], eos, 9]]  # one prompt ends with an EOS
    out = BlockDecoder(dlm, eos, B).generate(prompts, Sampling(threshold, max_new_tokens=20))
    for prompt, g in zip(prompts, out, strict=True):
        assert (g.tokens, g.forwards, g.discarded) == _reference(dlm, prompt, eos, 20, threshold)


def test_left_to_right_order_equals_the_reference_beside_confidence_rows(dlm, tiny_tokenizer):
    """Rows decoding left to right (one position per forward, the leftmost) batched with rows
    decoding by confidence: each equals the brute-force reference of its own order."""
    eos = tiny_tokenizer.eos_token_id
    prompts = _prompts()
    orders = ["left_to_right", "confidence"] * 2
    samplings = [Sampling(0.3, max_new_tokens=20, order=o) for o in orders]
    out = BlockDecoder(dlm, eos, B).generate(prompts, samplings)
    for prompt, order, g in zip(prompts, orders, out, strict=True):
        ref = _reference(dlm, prompt, eos, 20, 0.3, order)
        assert (g.tokens, g.forwards, g.discarded) == ref
        if order == "left_to_right":  # a forward per output token, nothing decided past it
            assert g.forwards == len(g.tokens) and g.discarded == 0


@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_eos_in_order_equals_the_reference_beside_plain_rows(eos_dlm, tiny_tokenizer, threshold):
    """Rows that accept nothing past their predicted end (EOS in order) batched with rows that
    do, on a model that ends its answers: each equals the brute-force reference of its own
    rule, tokens decided past the end counted alike; the rule leaves none."""
    eos = tiny_tokenizer.eos_token_id
    prompts = [*_prompts(), [*_prompts()[1][:5], eos, 9]]
    for flip in (False, True):  # each prompt under each rule, beside the other rule
        rules = [(i % 2 == 0) != flip for i in range(len(prompts))]
        samplings = [Sampling(threshold, max_new_tokens=20, eos_in_order=r) for r in rules]
        out = BlockDecoder(eos_dlm, eos, B).generate(prompts, samplings)
        for prompt, s, g in zip(prompts, samplings, out, strict=True):
            ref = _reference(eos_dlm, prompt, eos, 20, threshold, eos_in_order=s.eos_in_order)
            assert (g.tokens, g.forwards, g.discarded) == ref
            assert eos in g.tokens
            if s.eos_in_order:
                assert g.discarded == 0
    plain = BlockDecoder(eos_dlm, eos, B).generate(prompts, Sampling(0.05, max_new_tokens=20))
    assert sum(g.discarded for g in plain) > 0  # without the rule, decisions past the end


def test_a_row_leaves_the_batch_at_the_step_its_answer_is_complete(dlm, tiny_tokenizer):
    """A request whose output ends mid-block leaves before the next forward: it took part in
    exactly the forwards it counts, and the rows left in the batch decode as they would alone."""
    eos = tiny_tokenizer.eos_token_id
    prompts = [_prompts()[0], _prompts()[2]]  # 3 and 13 tokens: the short answer ends mid-block
    samplings = [Sampling(0.9, max_new_tokens=2), Sampling(0.9, max_new_tokens=30)]
    rows_per_forward: list[int] = []

    def count(module, args, kwargs):  # decoding steps only: the prefill asks for no logits
        if kwargs["logits_for"]:
            rows_per_forward.append(len(args[0]))

    hook = dlm.register_forward_pre_hook(count, with_kwargs=True)
    try:
        short, long = BlockDecoder(dlm, eos, B).generate(prompts, samplings)
    finally:
        hook.remove()
    assert len(short.tokens) == 2 and short.forwards < long.forwards
    assert rows_per_forward.count(2) == short.forwards  # gone from the next forward on
    alone = BlockDecoder(dlm, eos, B).generate(prompts[1:], samplings[1:])[0]
    assert (long.tokens, long.forwards) == (alone.tokens, alone.forwards)


def test_greedy_confidence_is_the_softmax_maximum():
    logits = torch.randn(3, 5, 97, generator=torch.Generator().manual_seed(0)) * 4
    expected, expected_tokens = logits.softmax(-1).max(-1)
    tokens, confidence = choose(logits.clone(), [Sampling()] * 3, [None] * 3, [True] * 3)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(confidence, expected)


def test_sampling_is_seeded_per_request(dlm, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    sampling = Sampling(threshold=0.5, max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    decoder = BlockDecoder(dlm, eos, B)
    a = decoder.generate(_prompts(), sampling, seeds=[1, 2, 3, 4])
    b = decoder.generate(_prompts()[2:3], sampling, seeds=[3])
    assert a[2].tokens == b[0].tokens
    assert len({tuple(g.tokens) for g in a}) > 1


@pytest.mark.parametrize("prompt_cut", [None, B - 1])  # B - 1: no prompt fills a block
def test_mixed_requests_in_one_batch_decode_as_alone(dlm, tiny_tokenizer, prompt_cut):
    """Per-request settings (τ, length, sampling) in one batch; short requests leave it early."""
    eos = tiny_tokenizer.eos_token_id
    samplings = [
        Sampling(threshold=0.05, max_new_tokens=5),
        Sampling(threshold=0.9, max_new_tokens=30),
        Sampling(threshold=0.5, max_new_tokens=12, temperature=0.8, top_p=0.95),
        Sampling(threshold=0.3, max_new_tokens=21, min_accept=2),
    ]
    seeds = [None, None, 11, None]
    prompts = [p[:prompt_cut] for p in _prompts()]
    for decoder in (BlockDecoder(dlm, eos, B), ARDecoder(dlm, eos)):
        batched = decoder.generate(prompts, samplings, seeds)
        alone = [
            decoder.generate([p], [s], [seed])[0]
            for p, s, seed in zip(prompts, samplings, seeds, strict=True)
        ]
        assert [g.tokens for g in batched] == [g.tokens for g in alone]
        assert [g.forwards for g in batched] == [g.forwards for g in alone]
        # The short request left the batch early: it took part in fewer forwards than the rest.
        assert batched[0].forwards < min(g.forwards for g in batched[1:])


def test_ar_decoder_equals_hf_generate(tiny_tokenizer):
    """The AR baseline, cached and batched, gives the greedy tokens of HF generate() on the same
    weights with HF's own attention and cache (an untied random head, so the greedy text varies)."""
    eos = tiny_tokenizer.eos_token_id
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tiny_tokenizer, seed=3)
    head = torch.randn(hf.lm_head.weight.shape, generator=torch.Generator().manual_seed(3))
    hf.lm_head.weight = torch.nn.Parameter(head)
    reference = copy.deepcopy(hf)
    dlm = DiffusionLM(hf, attention="dense").eval()
    out = ARDecoder(dlm, eos).generate(_prompts(), Sampling(max_new_tokens=12))
    assert all(len(set(g.tokens)) > 3 for g in out)
    for prompt, g in zip(_prompts(), out, strict=True):
        ref = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            suppress_tokens=[dlm.mask_token_id],
        )[0, len(prompt) :].tolist()
        assert g.tokens == ref
        assert g.forwards == len(g.tokens)
    plain = ARDecoder(dlm, eos, use_cache=False).generate(_prompts(), Sampling(max_new_tokens=12))
    assert [g.tokens for g in plain] == [g.tokens for g in out]


def test_stop_check_and_context_limit(dlm, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    decoder = BlockDecoder(dlm, eos, B)
    prompts = _prompts()[:2]
    out = decoder.generate(prompts, Sampling(threshold=0.5, max_new_tokens=40),
                           stop=lambda r, tokens: r == 1 and len(tokens) >= 8)  # fmt: skip
    assert out[1].finish_reason == "stop" and 8 <= len(out[1].tokens) < 8 + B
    # The other request knows nothing of the stop check: its budget or its EOS ends it.
    ended = eos in out[0].tokens
    assert out[0].finish_reason == ("stop" if ended else "length")
    assert ended or len(out[0].tokens) == 40
    limit = dlm.hf.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        decoder.generate([[5] * (limit - 4)], Sampling(max_new_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        ARDecoder(dlm, eos).generate([[]], Sampling())


def test_eos_inside_the_prompt_does_not_end_the_answer(dlm, tiny_tokenizer):
    """Chat templates end turns with the EOS token (Qwen3: <|im_end|>): an EOS in the prompt's
    tail, inside the first decoded block, must neither stop the request nor leak masks."""
    eos = tiny_tokenizer.eos_token_id
    prompts = [[*p[:5], eos, 7] for p in _prompts()]  # tail of 7 tokens < B, EOS inside it
    sampling = Sampling(threshold=0.5, max_new_tokens=12)
    cached = BlockDecoder(dlm, eos, B).generate(prompts, sampling)
    plain = BlockDecoder(dlm, eos, B, use_cache=False).generate(prompts, sampling)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    for g in cached:
        assert dlm.mask_token_id not in g.tokens and g.tokens


@pytest.mark.parametrize("kind", ["block", "ar"])
def test_ignore_eos_decodes_max_new_tokens_past_eos(dlm, tiny_tokenizer, kind):
    """Take a token the model generates as EOS: decoding stops right after it, unless the
    request ignores EOS, which decodes all its tokens (the same ones up to there)."""

    def decoder(eos: int):
        return BlockDecoder(dlm, eos, B) if kind == "block" else ARDecoder(dlm, eos)

    prompt = _prompts()[1]
    free = decoder(tiny_tokenizer.eos_token_id).generate([prompt], Sampling(0.5, max_new_tokens=20))
    eos = free[0].tokens[3]
    first = free[0].tokens.index(eos)
    stops = decoder(eos).generate([prompt], Sampling(0.5, max_new_tokens=20))[0]
    assert stops.tokens == free[0].tokens[: first + 1] and stops.finish_reason == "stop"
    ignored = decoder(eos).generate([prompt], Sampling(0.5, max_new_tokens=20, ignore_eos=True))
    assert ignored[0].tokens == free[0].tokens and ignored[0].finish_reason == "length"
