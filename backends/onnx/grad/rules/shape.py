"""Gradient rules of ops that only move values around: the gradient is moved back the same way."""
from __future__ import annotations

import numpy as np

from ..context import rule


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape_back(ctx, node, dys):
    return [ctx.reshape_like(dys[0], node.input[0])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose(ctx, node, dys):
    perm = ctx.attr(node, "perm")
    if perm is None:
        perm = list(range(ctx.rank(node.input[0])))[::-1]
    return [ctx.emit("Transpose", [dys[0]], perm=[int(i) for i in np.argsort(perm)])]
