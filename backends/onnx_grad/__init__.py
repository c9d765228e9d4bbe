"""Reverse-mode differentiation of ONNX graphs, written as ONNX.

`build_gradient_model` turns a model into one whose extra outputs are the input gradient and, per
requested layer, the activation and its gradient, for an objective built into the same graph. One
rule per op type (rules_*.py), found through the registry, each writing its gradient as ONNX ops.
"""
from .builder import GradientRequest, build_gradient_model
from .registry import RULES

__all__ = ["GradientRequest", "build_gradient_model", "RULES"]
