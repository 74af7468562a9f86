"""Serving: a text engine over the decoders, the OpenAI request shapes, and the Ray Serve app."""
