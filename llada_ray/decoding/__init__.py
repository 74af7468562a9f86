"""Decoding: block diffusion with an exact prefix KV cache, and the AR baseline on the same
static-shape engine."""

from llada_ray.decoding.ar import ARDecoder
from llada_ray.decoding.batch import Decoder
from llada_ray.decoding.block import BlockDecoder
from llada_ray.decoding.engine import EngineOptions
from llada_ray.decoding.sampling import Generation, Sampling

__all__ = ["ARDecoder", "BlockDecoder", "Decoder", "EngineOptions", "Generation", "Sampling"]
