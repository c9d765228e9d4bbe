"""Gradient rules of normalisation: BatchNormalization (inference form), InstanceNormalization,
LayerNormalization."""
from __future__ import annotations

import numpy as np

from ..context import linear, rule


def _per_channel(ctx, values, rank):
    """A (C,) vector shaped (C, 1, ..., 1) to broadcast over an (N, C, ...) tensor of that rank: a
    numpy array reshaped at build time, or a tensor unsqueezed in the graph."""
    if isinstance(values, str):
        return ctx.unsqueeze(values, list(range(1, rank - 1)))
    return ctx.const(values.reshape(-1, *([1] * (rank - 2))), dtype=values.dtype)


@linear("BatchNormalization")
def batch_norm(ctx, node, dy):
    """Inference form: y = (x - mean) / sqrt(var + eps) * scale + bias, a per-channel scale."""
    x, scale, _bias, _mean, var = node.input[:5]
    eps = float(ctx.attr(node, "epsilon", 1e-5))
    sv, vv = ctx.const_value(scale), ctx.const_value(var)
    rank = ctx.rank(x)
    # From opset 15 the statistics may be of another float type than x (float32 ones of a float16
    # model): the factor is written in x's.
    if sv is not None and vv is not None:
        factor = _per_channel(ctx, (sv / np.sqrt(vv.astype(np.float64) + eps)).astype(ctx.float_dtype), rank)
    else:
        factor = ctx.emit("Div", [scale, ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.const_like(eps, var)])])])
        if ctx.dtypes.get(scale) != ctx.float_type:
            factor = ctx.emit("Cast", [factor], to=ctx.float_type)
        factor = _per_channel(ctx, factor, rank)
    return ctx.emit("Mul", [dy, factor])


def _standardize(ctx, x, axes, eps):
    """(x - mean) * rstd and rstd = 1 / sqrt(var + eps), var the biased variance over axes."""
    centred = ctx.emit("Sub", [x, ctx.reduce("ReduceMean", x, axes, keepdims=True)])
    var = ctx.reduce("ReduceMean", ctx.emit("Mul", [centred, centred]), axes, keepdims=True)
    rstd = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.const(eps)])])])
    return ctx.emit("Mul", [centred, rstd]), rstd


def _standardize_backward(ctx, g, xhat, rstd, axes):
    """d/dx of xhat = (x - mean) * rstd contracted with g: rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    mean_g = ctx.reduce("ReduceMean", g, axes, keepdims=True)
    mean_gx = ctx.reduce("ReduceMean", ctx.emit("Mul", [g, xhat]), axes, keepdims=True)
    inner = ctx.emit("Sub", [ctx.emit("Sub", [g, mean_g]), ctx.emit("Mul", [xhat, mean_gx])])
    return ctx.emit("Mul", [rstd, inner])


@rule("InstanceNormalization")
def instance_norm(ctx, node, dys):
    """y = scale[c] * xhat + B[c], xhat standardised over the spatial axes of each (n, c):
    dX = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dY * scale[c]."""
    ctx.only_data_input(node)
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    axes = list(range(2, rank))
    value = ctx.const_value(scale)
    scale = _per_channel(ctx, scale if value is None else value, rank)
    xhat, rstd = _standardize(ctx, x, axes, float(ctx.attr(node, "epsilon", 1e-5)))
    g = ctx.emit("Mul", [dys[0], scale])
    return [_standardize_backward(ctx, g, xhat, rstd, axes), None, None]


@rule("LayerNormalization")
def layer_norm(ctx, node, dys):
    """y = xhat * scale + B, xhat standardised over the axes from `axis` on (opset 17):
    dX = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dY * scale, plus what flows
    through the optional Mean (dMean / M) and InvStdDev (-dInv * rstd^2 * xhat / M) outputs."""
    ctx.only_data_input(node)
    x = node.input[0]
    rank = ctx.rank(x)
    axis = int(ctx.attr(node, "axis", -1)) % rank
    axes = list(range(axis, rank))
    xhat, rstd = _standardize(ctx, x, axes, float(ctx.attr(node, "epsilon", 1e-5)))
    parts = []
    if dys[0] is not None:
        g = ctx.emit("Mul", [dys[0], node.input[1]])
        parts.append(_standardize_backward(ctx, g, xhat, rstd, axes))
    extra = [(k, dys[k]) for k in (1, 2) if len(dys) > k and dys[k] is not None]
    if extra:
        kept = ctx.int64s([0] * axis + [1] * (rank - axis))    # the statistics' shape with keepdims
        inverse_m = ctx.inverse_count(x, node.output[extra[0][0]], axes)
        for k, d in extra:
            d = ctx.emit("Mul", [ctx.emit("Reshape", [d, kept]), inverse_m])
            if k == 1:                                          # Mean: d mean / dx = 1 / M
                parts.append(ctx.expand_like(d, x))
            else:                                               # InvStdDev: d rstd / dx = -rstd^2 xhat / M
                parts.append(ctx.emit("Neg", [ctx.emit("Mul", [ctx.emit("Mul", [d, ctx.emit("Mul", [rstd, rstd])]),
                                                                xhat])]))
    return [ctx.add_all(parts)] + [None] * (len(node.input) - 1)
