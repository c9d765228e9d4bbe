"""Gradient rules of ops that select, pad, resize or repeat values."""
from .registry import rule  # noqa: F401
