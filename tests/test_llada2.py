"""LLaDA2.0 (`llada2_moe`) as our native model: a checkpoint laid out like the released ones loads
into it without remote code, its weights carry the released names, its routing and attention
match references written out here, and it runs under our layouts and KV cache."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from llada_ray.config import ScalingConfig
from llada_ray.decoding import BlockDecoder, Sampling
from llada_ray.diffusion.masks import causal_layout, position_ids_for
from llada_ray.model import DiffusionLM, ensure_mask_token, load_model, train_tokenizer
from llada_ray.model.adapter import block_diffusion_inputs, causal_inputs
from llada_ray.model.llada2 import LLaDA2MoeConfig, LLaDA2MoeForCausalLM
from llada_ray.train.engine import load_hf_weights, place

VOCAB = 320  # more rows than tokens, as the released checkpoints (157184 rows)
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS = 64, 4, 2, 16, 8

# LLaDA2's chat format: `<role>…</role>` headers, `<|role_end|>` closing each turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<role>{{ 'HUMAN' if m['role'] == 'user' else m['role'] | upper }}"
    "</role>{{ m['content'] }}<|role_end|>{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)


def released_style_config(eos_id: int) -> dict:
    """config.json with every key of the released LLaDA2.0-mini one (tiny sizes), including
    `auto_map` to remote code that is not there: loading must not need it."""
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
        },
        "model_type": "llada2_moe",
        "attention_dropout": 0.0,
        "num_hidden_layers": 3,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "num_experts_per_tok": 2,
        "norm_head": False,
        "num_attention_heads": HEADS,
        "num_experts": EXPERTS,
        "num_key_value_heads": KV_HEADS,
        "rope_theta": 600000,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_bias": False,
        "use_rmsnorm": True,
        "rms_norm_eps": 1e-06,
        "head_dim": HEAD_DIM,
        "num_shared_experts": 1,
        "use_cache": False,
        "use_qkv_bias": False,
        "embedding_dropout": 0.0,
        "norm_softmax": False,
        "output_dropout": 0.0,
        "vocab_size": VOCAB,
        "rotary_dim": HEAD_DIM // 2,
        "using_split_qkv_in_self_attention": False,
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "routed_scaling_factor": 2.5,
        "n_group": 2,
        "topk_group": 1,
        "score_function": "sigmoid",
        "initializer_range": 0.02,
        "max_window_layers": 28,
        "output_router_logits": False,
        "pad_token_id": eos_id,
        "partial_rotary_factor": 0.5,
        "use_sliding_window": False,
    }


def llada2_tokenizer() -> PreTrainedTokenizerFast:
    """LLaDA2's special tokens: EOS = pad `<|endoftext|>`, mask `<|mask|>`, role markers."""
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]
    tokenizer = train_tokenizer(texts * 20, vocab_size=300)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<role>", "</role>", "<|role_end|>"]}
    )
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random tiny LLaDA2 saved as the released ones are; returns (dir, its state dict)."""
    directory = tmp_path_factory.mktemp("llada2")
    tokenizer = llada2_tokenizer()
    config_json = released_style_config(tokenizer.eos_token_id)
    drop = ("architectures", "auto_map", "model_type")
    config = LLaDA2MoeConfig(**{k: v for k, v in config_json.items() if k not in drop})
    torch.manual_seed(0)
    model = LLaDA2MoeForCausalLM(config)
    with torch.no_grad():  # trained-looking norms and router biases, not the init's 1s and 0s
        for name, tensor in model.state_dict().items():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                tensor.normal_(1.0, 0.2)
            elif name.endswith("expert_bias"):
                tensor.normal_(0.0, 0.05)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def loaded(checkpoint) -> tuple[LLaDA2MoeForCausalLM, PreTrainedTokenizerFast]:
    model, tokenizer = load_model(checkpoint[0])
    return model.eval(), tokenizer


def test_released_layout_loads_into_our_class_without_remote_code(checkpoint, loaded) -> None:
    directory, saved = checkpoint
    model, tokenizer = loaded
    assert not (directory / "modeling_llada2_moe.py").exists()
    assert type(model) is LLaDA2MoeForCausalLM
    assert not [m for m in sys.modules if m.startswith("transformers_modules")]
    assert model.config.rope_parameters["rope_theta"] == 600000
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert model.config.use_qk_norm  # absent from config.json: the reference default holds
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    # The tokenizer's own mask token is used; no embedding row is added.
    assert model.config.mask_token_id == tokenizer.convert_tokens_to_ids("<|mask|>")
    assert model.get_input_embeddings().weight.shape[0] == VOCAB
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != model.config.mask_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>"


def test_a_llada2_1_checkpoint_loads_like_a_llada2_0_one(checkpoint, loaded, tmp_path) -> None:
    """LLaDA2.1-mini (Feb 2026) ships the same architecture, weight names and config keys; its
    config.json differs in spelling (`dtype`, a `sliding_window`, a newer transformers) and in
    its context (32,768). The same weights under that config load and give the same logits."""
    directory, _ = checkpoint
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = config.pop("torch_dtype")
    config |= {"sliding_window": 4096, "transformers_version": "4.57.1",
               "max_position_embeddings": 32768}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    model, _ = load_model(tmp_path)
    assert type(model) is LLaDA2MoeForCausalLM
    assert model.config.max_position_embeddings == 32768
    assert not [m for m in sys.modules if m.startswith("transformers_modules")]
    ids = torch.randint(5, 290, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, loaded[0](ids).logits)


# Tensor names of the released shards (LLaDA2.0-mini: layer 0 dense, layers 1-19 MoE): the
# reference module tree, and the keys dFactory's scripts/moe_convertor.py reads from them.
GLOBAL_KEYS = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
LAYER_KEYS = [
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.attention.query_key_value.weight",
    "model.layers.{i}.attention.query_layernorm.weight",
    "model.layers.{i}.attention.key_layernorm.weight",
    "model.layers.{i}.attention.dense.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
]
DENSE_KEYS = [f"model.layers.{{i}}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
MOE_KEYS = [
    "model.layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.gate.expert_bias",
    *(
        f"model.layers.{{i}}.mlp.shared_experts.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    ),
    *(
        f"model.layers.{{i}}.mlp.experts.{e}.{p}.weight"
        for e in range(EXPERTS)
        for p in ("gate_proj", "up_proj", "down_proj")
    ),
]


def test_weight_names_are_the_released_ones(checkpoint) -> None:
    directory, saved = checkpoint
    expected = set(GLOBAL_KEYS)
    for i in range(3):
        expected |= {k.format(i=i) for k in LAYER_KEYS + (DENSE_KEYS if i == 0 else MOE_KEYS)}
    assert set(saved) == expected
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert set(f.keys()) == expected
    assert saved["model.layers.0.attention.query_key_value.weight"].shape == (
        (HEADS + 2 * KV_HEADS) * HEAD_DIM,
        HIDDEN,
    )
    assert saved["model.layers.1.mlp.gate.weight"].shape == (EXPERTS, HIDDEN)


def _best(candidates: list[int], key: list[float], k: int) -> list[int]:
    return sorted(candidates, key=lambda e: -key[e])[:k]


def test_moe_routing_matches_a_per_token_reference(loaded) -> None:
    moe = loaded[0].model.layers[1].mlp
    gate, group_size = moe.gate, EXPERTS // 2
    x = torch.randn(3, 8, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = moe(x).reshape(-1, HIDDEN)
    bias_mattered = group_limit_mattered = False
    for t, h in enumerate(x.reshape(-1, HIDDEN)):
        with torch.no_grad():
            score = torch.sigmoid(gate.weight @ h).tolist()
            biased = [s + b for s, b in zip(score, gate.expert_bias.tolist(), strict=True)]
            # n_group = 2, topk_group = 1: the group whose two best biased scores sum highest
            groups = [sorted(biased[g * group_size : (g + 1) * group_size]) for g in range(2)]
            group = max(range(2), key=lambda g: groups[g][-1] + groups[g][-2])
            in_group = list(range(group * group_size, (group + 1) * group_size))
            chosen = _best(in_group, biased, 2)
            total = sum(score[e] for e in chosen)
            want = moe.shared_experts(h)
            for e in chosen:
                want = want + 2.5 * score[e] / total * moe.experts[e](h)
        torch.testing.assert_close(ours[t], want, atol=1e-5, rtol=1e-5)
        bias_mattered |= set(chosen) != set(_best(in_group, score, 2))
        group_limit_mattered |= set(chosen) != set(_best(list(range(EXPERTS)), biased, 2))
    assert bias_mattered and group_limit_mattered  # both rules were exercised


def test_attention_matches_the_reference_math(loaded) -> None:
    """Fused qkv [q | k | v], per-head RMSNorm, RoPE on the first half of each head (pairs i and
    i + d/2), GQA, causal softmax, `dense`: written out by hand."""
    attention = loaded[0].model.layers[0].attention
    n, rot = 6, HEAD_DIM // 2
    x = torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(n)[None]
    with torch.no_grad():
        ours, _ = attention(x, loaded[0].model.rotary_emb(x, positions), None)
        heads = (x[0] @ attention.query_key_value.weight.T).view(n, -1, HEAD_DIM)

        def rms(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

        def rope(v: torch.Tensor) -> torch.Tensor:
            out = v.clone()
            for p in range(n):
                for i in range(rot // 2):
                    angle = p * 600000 ** (-2 * i / rot)
                    a, b = v[p, :, i], v[p, :, i + rot // 2]
                    out[p, :, i] = a * math.cos(angle) - b * math.sin(angle)
                    out[p, :, i + rot // 2] = b * math.cos(angle) + a * math.sin(angle)
            return out

        q = rope(rms(heads[:, :HEADS], attention.query_layernorm.weight))
        k = rope(rms(heads[:, HEADS : HEADS + KV_HEADS], attention.key_layernorm.weight))
        v = heads[:, HEADS + KV_HEADS :]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        outs = []
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            scores = (q[:, h] @ k[:, kv].T) / math.sqrt(HEAD_DIM)
            outs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, kv])
        want = torch.cat(outs, -1) @ attention.dense.weight.T
    torch.testing.assert_close(ours[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["block_sparse", "dense"])
def test_causal_layout_reproduces_hf_sdpa(loaded, attention: str) -> None:
    hf = loaded[0]
    dlm = DiffusionLM(copy.deepcopy(hf), attention=attention, tile_size=16).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    docs = torch.zeros_like(ids)
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ours = dlm(**causal_inputs(ids, docs, position_ids_for(docs, True)))
        theirs = hf(input_ids=ids).logits
        torch.testing.assert_close(eager(input_ids=ids).logits, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_block_diffusion_layout_equals_hf_with_a_4d_mask(loaded) -> None:
    """Noisy block k under the training layout = HF's forward of [clean blocks < k ; block k]
    with the block-causal 4D mask the reference decodes with."""
    hf = loaded[0]
    dlm = DiffusionLM(copy.deepcopy(hf), attention="block_sparse", tile_size=8).eval()
    block, n = 4, 12
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(5, 290, (1, n), generator=gen)
    xt = torch.where(torch.rand(1, n, generator=gen) < 0.5, dlm.mask_token_id, x0)
    docs = torch.zeros_like(x0)
    with torch.no_grad():
        ours = dlm(**block_diffusion_inputs(xt, x0, docs, position_ids_for(docs, False), block))
        for lo in range(0, n, block):
            hi = lo + block
            blk = torch.arange(hi) // block
            allow = (blk[None, :] <= blk[:, None])[None, None]
            ids = torch.cat([x0[:, :lo], xt[:, lo:hi]], 1)
            theirs = hf(input_ids=ids, position_ids=torch.arange(hi)[None], attention_mask=allow)
            torch.testing.assert_close(
                ours[:, lo:hi], theirs.logits[:, lo:hi], atol=1e-5, rtol=1e-5
            )


def test_hf_generate_and_resize(loaded) -> None:
    model = copy.deepcopy(loaded[0])
    ids = torch.randint(5, 290, (2, 5), generator=torch.Generator().manual_seed(5))
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 11) and torch.equal(cached, plain)
    model.resize_token_embeddings(VOCAB + 3, mean_resizing=False)
    assert model.get_input_embeddings().weight.shape == (VOCAB + 3, HIDDEN)
    assert model.get_output_embeddings().weight.shape == (VOCAB + 3, HIDDEN)
    assert model(ids).logits.shape == (2, 5, VOCAB + 3)


@pytest.mark.parametrize(
    ("threshold", "edit_threshold", "multi_block"),
    [(0.05, None, False), (0.5, None, False), (0.5, 0.3, False), (0.5, 0.3, True)],
)
def test_block_decoding_with_cache_gives_the_tokens_of_no_cache(
    loaded, threshold, edit_threshold, multi_block
) -> None:
    """Plain, and with token editing (a LLaDA2.1 checkpoint is this architecture)."""
    hf, tokenizer = copy.deepcopy(loaded[0]), loaded[1]
    with torch.no_grad():  # sharper distributions than a fresh init: confidences spread out
        hf.get_output_embeddings().weight.mul_(12.0)
    dlm = DiffusionLM(hf, attention="dense").eval()
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(5, 290, (n,), generator=gen).tolist() for n in (3, 10)]
    sampling = Sampling(threshold=threshold, edit_threshold=edit_threshold, max_new_tokens=12)
    eos = tokenizer.eos_token_id
    cached = BlockDecoder(dlm, eos, 4, multi_block_edit=multi_block).generate(prompts, sampling)
    plain = BlockDecoder(dlm, eos, 4, use_cache=False, multi_block_edit=multi_block).generate(
        prompts, sampling
    )
    assert [(g.tokens, g.edits) for g in cached] == [(g.tokens, g.edits) for g in plain]
    assert sum(len(g.tokens) for g in cached) > 4
    if edit_threshold is not None:
        assert sum(g.edits for g in cached) > 0


def test_meta_build_loaded_shard_wise_equals_from_pretrained(checkpoint) -> None:
    """Training builds the model on `meta`, allocates it (sharded under FSDP) and reads each
    weight slice from the safetensors: the result is HF's from_pretrained model, buffers (the
    rotary frequencies, rebuilt from the config) and logits included."""
    directory, _ = checkpoint
    model, tokenizer = load_model(directory)  # not the shared fixture: other tests change it
    with torch.device("meta"):
        config = AutoConfig.from_pretrained(directory)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # as training does
    ensure_mask_token(hf, tokenizer, "<|mask|>")
    dlm = DiffusionLM(hf)
    place(dlm, ScalingConfig(num_workers=1), torch.float32, torch.device("cpu"))
    load_hf_weights(dlm, directory)
    want = dict(model.named_buffers()) | model.state_dict()
    got = dict(hf.named_buffers()) | hf.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name].float(), rtol=0, atol=0, msg=name)
    ids = torch.randint(0, VOCAB, (1, 24))
    position = torch.arange(24)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            DiffusionLM(model).eval()(ids, causal_layout(torch.zeros_like(ids)), position),
            dlm.eval()(ids, causal_layout(torch.zeros_like(ids)), position),
        )
