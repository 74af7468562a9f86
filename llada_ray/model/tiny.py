"""The embedded default: a tokenizer trained on local text and a tiny model built from scratch.

Nothing here touches the network, so the demo and the tests run on a machine with no hub access.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from llada_ray.config import TinyModelConfig
from llada_ray.model.llada2 import LLaDA2MoeConfig

EOS, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]

# A role token, the content, EOS: the prompt ends with the assistant's role token, so SFT
# supervises exactly the response, which ends with EOS, where decoding stops. One token per role
# (not ChatML's `<|im_start|>assistant\n`): short rows for a small model and a character vocabulary.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}" + EOS + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with digits split one per token, for exact arithmetic.

    A `vocab_size` of at most 256 + the special tokens learns no merge: one token per byte, a
    character tokenizer for ASCII text, in which copying, reversing and case mapping work
    letter by letter."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, MASK, *ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        additional_special_tokens=ROLES,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )


def build_tiny_model(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised Llama, Qwen or LLaDA2-MoE model sized by `cfg`, vocabulary from
    the tokenizer."""
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }
    if cfg.family == "llada2_moe":
        config = LLaDA2MoeConfig(
            **common,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            n_group=cfg.expert_groups,
            topk_group=cfg.groups_per_token,
            moe_intermediate_size=cfg.expert_intermediate_size,
            num_shared_experts=cfg.shared_experts,
            first_k_dense_replace=cfg.dense_layers,
            embedding_dropout=0.0,
            attention_dropout=0.0,
            output_dropout=0.0,
        )
    else:
        config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
        config = config_cls[cfg.family](
            **common,
            head_dim=cfg.hidden_size // cfg.num_heads,
            tie_word_embeddings=True,
            bos_token_id=None,
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
