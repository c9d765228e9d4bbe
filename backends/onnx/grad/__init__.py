"""Reverse-mode differentiation of ONNX graphs, written as ONNX (builder.py; one rule per op type in rules/)."""
