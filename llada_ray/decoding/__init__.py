"""Decoding: block diffusion with an exact prefix KV cache (the AR baseline arrives with #6)."""

from llada_ray.decoding.block import BlockDecoder, Generation, Sampling

__all__ = ["BlockDecoder", "Generation", "Sampling"]
