"""Gradient rules of pooling, normalisation, reductions and ConvTranspose."""
from .registry import rule  # noqa: F401
