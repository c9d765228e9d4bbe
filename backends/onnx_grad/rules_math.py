"""Gradient rules of elementwise math, activations and softmax."""
from .registry import rule  # noqa: F401
