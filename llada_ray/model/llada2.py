"""LLaDA2.0 (`model_type: llada2_moe`) as a native transformers model.

The real checkpoints (inclusionAI/LLaDA2.0-mini, -flash) ship their architecture as remote code
(`modeling_llada2_moe.py`, listed in config.json's `auto_map`). We never execute it: nothing a
download contains runs here (`trust_remote_code` stays False). That file is also written for
transformers 4.x (its own mask building, `past_key_value`); this one follows the 5.x conventions
(`ALL_ATTENTION_FUNCTIONS`, `create_causal_mask`, `cache=`) so the model runs under our attention
layouts and exact KV cache exactly like Llama / Qwen3, while plain HF use (sdpa, eager, generate)
keeps working. Parameter names are the checkpoints' safetensors names, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a real checkpoint into these classes.

The architecture is Ant's Ling 2.0 (BailingMoeV2) family: a fused `query_key_value` projection
(heads laid out [q | k | v]), RMSNorm on queries and keys per head before RoPE, rotary on the
first `partial_rotary_factor` of each head (rotate-half layout), output projection `dense`; the
first `first_k_dense_replace` layers have a dense SwiGLU MLP, the others a sigmoid-routed MoE
(expert-bias for selection only, group-limited top-k, weights renormalised and scaled by
`routed_scaling_factor`) plus always-on shared experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    eager_attention_forward,
    rotate_half,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

MODEL_TYPE = "llada2_moe"


class LLaDA2MoeConfig(PreTrainedConfig):
    """The checkpoints' config.json, keys and defaults as in their `configuration_llada2_moe.py`.

    config.json also carries keys the architecture never reads (`rotary_dim`, `score_function`,
    `router_dtype`, `moe_router_enable_expert_bias`, `norm_topk_prob`, `use_rmsnorm`, ...): they
    are kept as plain attributes. The reference routes with sigmoid, fp32 and an expert bias, and
    renormalises the top-k weights, whatever those keys say; so do we.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 0  # reference default; 0 / None mean one per query head
    head_dim: int | None = None
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = True  # absent from the released config.json: this default applies
    use_bias: bool = True  # bias of the attention output projection `dense`
    rms_norm_eps: float = 1e-5
    norm_head: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    output_dropout: float = 0.1
    initializer_range: float = 0.02
    max_position_embeddings: int = 16384
    rope_parameters: dict | None = None  # from rope_theta / rope_scaling / partial_rotary_factor
    use_cache: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_experts: int | None = 16
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    output_router_logits: bool = False

    def __post_init__(self, **kwargs) -> None:
        # The reference's RoPE defaults; transformers folds them into `rope_parameters`.
        kwargs.setdefault("rope_theta", 10000.0)
        kwargs.setdefault("partial_rotary_factor", 0.5)
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        # The reference never applies a window (its flash path is disabled); with
        # `sliding_window` set, transformers' caches and masks would.
        if not self.use_sliding_window:
            self.sliding_window = None
        super().__post_init__(**kwargs)


class LLaDA2MoeRotaryEmbedding(nn.Module):
    """cos / sin for the rotary part of each head (`head_dim * partial_rotary_factor` dims)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn = (
            self.compute_default_rope_parameters
            if self.rope_type == "default"
            else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = init_fn(config)
        # Not persistent: rebuilt by `_init_weights` when a checkpoint loads onto the meta device.
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: LLaDA2MoeConfig, device: torch.device | None = None, **kwargs: object
    ) -> tuple[torch.Tensor, float]:
        params = config.rope_parameters
        dim = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
        exponent = torch.arange(0, dim, 2, dtype=torch.float) / dim
        return 1.0 / (params["rope_theta"] ** exponent).to(device), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_partial_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half layout) on the first `cos.shape[-1]` dims of each head; the rest pass.

    q, k [batch, heads, n, head_dim]; cos, sin [batch, n, rotary_dim].
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :d], x[..., d:]
        return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)

    return rotate(q), rotate(k)


class LLaDA2MoeAttention(nn.Module):
    """GQA with a fused qkv projection, per-head QK RMSNorm and partial RoPE.

    The core softmax(qk^T)v goes through `ALL_ATTENTION_FUNCTIONS` (sdpa, eager, flex, or our
    `llada_ray` layouts), which receives the forward's extra kwargs.
    """

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by sdpa / eager
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True  # plain HF use is causal; our layouts ignore it
        self.query_key_value = nn.Linear(
            config.hidden_size,
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
            bias=config.use_qkv_bias,
        )
        self.query_layernorm = self.key_layernorm = None
        if config.use_qk_norm:
            self.query_layernorm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.dense = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, n = hidden_states.shape[:-1]
        qkv = self.query_key_value(hidden_states).view(batch, n, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.query_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_partial_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.dense(out.reshape(batch, n, -1)), weights


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU: the dense layers' MLP, each expert, and the shared experts."""

    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Sigmoid router: the expert bias steers which experts are chosen, not how much they weigh."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.expert_bias = nn.Buffer(torch.zeros(config.num_experts))  # in the checkpoint

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] → (router logits [tokens, experts], weights, experts [tokens, k])."""
        logits = F.linear(x.float(), self.weight.float())  # routing in fp32, as trained
        scores = logits.sigmoid()
        choice = scores + self.expert_bias.float()
        # Keep the `topk_group` groups whose two best experts score highest, then the top k.
        grouped = choice.view(x.shape[0], self.n_group, -1)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * self.scale, experts


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (one module each: the checkpoint's `experts.{e}.*` names) + shared ones."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(
            LLaDA2MoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_experts = None
        if config.num_shared_experts:
            width = config.moe_intermediate_size * config.num_shared_experts
            self.shared_experts = LLaDA2MoeMLP(config, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, chosen = self.gate(x)
        # Group the (token, slot) pairs by expert: one sort, one gather, each expert one matmul
        # over its contiguous rows, one weighted scatter back (no per-token work in Python).
        k = chosen.shape[1]
        order = chosen.flatten().argsort(stable=True)
        token = order // k
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        grouped = x[token].split(counts)
        # Every expert runs, even on no tokens, in training and in any process group: under
        # ZeRO-3 every rank must call the same modules (validation too), and DDP wants a
        # gradient for every parameter. Decoding alone skips the idle ones.
        every = self.training or (dist.is_available() and dist.is_initialized())
        outs = [
            expert(rows)
            for expert, rows in zip(self.experts, grouped, strict=True)
            if every or rows.shape[0]
        ]
        scale = weights.flatten()[order, None]
        routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        routed.index_add_(0, token, torch.cat(outs).float() * scale)
        out = routed.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        sparse = config.num_experts is not None and layer_idx >= config.first_k_dense_replace
        self.mlp = (
            LLaDA2MoeSparseMoeBlock(config)
            if sparse
            else LLaDA2MoeMLP(config, config.intermediate_size)
        )
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        attended, _ = self.attention(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    config: LLaDA2MoeConfig
    base_model_prefix = "model"
    _input_embed_layer = "word_embeddings"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LLaDA2MoeDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs: ClassVar[dict] = {
        "hidden_states": LLaDA2MoeDecoderLayer,
        "attentions": LLaDA2MoeAttention,
        "router_logits": OutputRecorder(LLaDA2MoeGate, index=0),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LLaDA2MoeGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.expert_bias)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, config.pad_token_id
        )
        self.layers = nn.ModuleList(
            LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LLaDA2MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (position_ids + seen).unsqueeze(0)
        # None for an attention implementation without a mask function (ours: the layout is
        # the mask); a 4D mask passed in (e.g. LLaDA2's block-causal one) is used as given.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class LLaDA2MoeForCausalLM(LLaDA2MoePreTrainedModel, GenerationMixin):
    """The checkpoints' `LLaDA2MoeModelLM`: the base model under `model`, then `lm_head`.

    As in the reference, `labels` are compared with the logits at the same position (a
    diffusion LM predicts the token under each mask, not the next one).
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "lm_head.weight": "model.word_embeddings.weight"
    }

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: object,
    ) -> MoeCausalLMOutputWithPast:
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().flatten(0, -2), labels.flatten().to(logits.device)
            )
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


AutoConfig.register(MODEL_TYPE, LLaDA2MoeConfig)
AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel)
AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeForCausalLM)
