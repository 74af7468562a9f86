"""HF causal LM → diffusion LM: mask token, attention layouts, embedding noise, save/load."""

from llada_ray.model.adapter import DiffusionLM, embedding_rms, ensure_mask_token
from llada_ray.model.io import load_model, save_model
from llada_ray.model.llada2 import LLaDA2MoeConfig, LLaDA2MoeForCausalLM  # registers llada2_moe
from llada_ray.model.tiny import build_tiny_model, train_tokenizer

__all__ = [
    "DiffusionLM",
    "LLaDA2MoeConfig",
    "LLaDA2MoeForCausalLM",
    "build_tiny_model",
    "embedding_rms",
    "ensure_mask_token",
    "load_model",
    "save_model",
    "train_tokenizer",
]
