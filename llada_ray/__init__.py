"""llada-ray: the LLaDA2.0 recipe (AR → block-diffusion LM) on Ray, and fast diffusion serving."""

__version__ = "0.1.0"
