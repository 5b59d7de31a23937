"""editkit: train, run and evaluate instruction-based image-editing diffusion models."""

__version__ = "0.1.0"
