"""Gradient rules of the reductions over axes: ReduceSum, ReduceMean, ReduceMax and the norms
ReduceL1, ReduceL2, ReduceSumSquare, ReduceLogSumExp (F.normalize exports ReduceL2)."""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError

from ..context import linear, node_label, rule


def _reduce_axes(ctx, node):
    """The reduced axes (sorted, non-negative), or None when the node is the identity
    (empty axes with noop_with_empty_axes=1). Axes are an attribute before opset 13 (ReduceSum)
    or 18 (the others, the norms included), then an optional input; absent or empty means all axes."""
    rank = ctx.rank(node.input[0])
    if ctx.opset >= (13 if node.op_type == "ReduceSum" else 18):
        axes = []
        if len(node.input) > 1 and node.input[1]:
            value = ctx.const_value(node.input[1])
            if value is None:
                raise MultisalError(f"{node.op_type} node {node_label(node)!r}: its axes ({node.input[1]!r}) are "
                                    "computed in the graph; only constant axes are supported")
            axes = [int(a) for a in np.asarray(value).ravel()]
        if not axes and int(ctx.attr(node, "noop_with_empty_axes", 0)):
            return None
    else:
        axes = list(ctx.attr(node, "axes", []))
    if not axes:
        return list(range(rank))
    return sorted({int(a) % rank for a in axes})


def _keep_dims(ctx, node, name, axes):
    """A reduced tensor (the output or its gradient) with the reduced axes back as size 1."""
    if int(ctx.attr(node, "keepdims", 1)):
        return name
    return ctx.unsqueeze(name, axes)


@linear("ReduceSum")
def reduce_sum(ctx, node, dy):
    """dX = dY broadcast back over the reduced axes."""
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return dy
    return ctx.expand_like(_keep_dims(ctx, node, dy, axes), node.input[0])


@linear("ReduceMean")
def reduce_mean(ctx, node, dy):
    """dX = dY / M broadcast back over the reduced axes (M = the number of elements reduced)."""
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return dy
    x = node.input[0]
    scaled = ctx.emit("Mul", [_keep_dims(ctx, node, dy, axes), ctx.inverse_count(x, node.output[0], axes)])
    return ctx.expand_like(scaled, x)


@rule("ReduceMax")
def reduce_max(ctx, node, dys):
    """dX = dY * (X == Y) / (number of maximal elements): ties share the gradient equally, as
    TensorFlow's reduce_max and torch's amax do."""
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return [dys[0], None]
    x = node.input[0]
    hit = ctx.mask(ctx.emit("Equal", [x, _keep_dims(ctx, node, node.output[0], axes)]))
    count = ctx.reduce("ReduceSum", hit, axes, keepdims=True)
    share = ctx.emit("Div", [_keep_dims(ctx, node, dys[0], axes), count])
    return [ctx.emit("Mul", [hit, share]), None]



def _with_kept_dims(ctx, node, dy):
    """(Y, dY) with the reduced axes back as size 1, so they broadcast against X. With no axes
    reduced (noop_with_empty_axes) a norm is taken of each element alone (ReduceL2 gives |X|,
    ReduceSumSquare X^2, as onnxruntime computes them) and the rules' formulas still hold."""
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return node.output[0], dy
    return _keep_dims(ctx, node, node.output[0], axes), _keep_dims(ctx, node, dy, axes)


@rule("ReduceSumSquare")
def reduce_sum_square(ctx, node, dys):
    """Y = sum X^2: dX = 2 X dY."""
    x = node.input[0]
    _, dy = _with_kept_dims(ctx, node, dys[0])
    return [ctx.emit("Mul", [dy, ctx.emit("Add", [x, x])]), None]


@rule("ReduceL1")
def reduce_l1(ctx, node, dys):
    """Y = sum |X|: dX = sign(X) dY (0 at X = 0, as Abs's rule takes)."""
    _, dy = _with_kept_dims(ctx, node, dys[0])
    return [ctx.emit("Mul", [dy, ctx.emit("Sign", [node.input[0]])]), None]


@rule("ReduceL2")
def reduce_l2(ctx, node, dys):
    """Y = sqrt(sum X^2): dX = X dY / Y. Where Y = 0 (all of X zero) dX = 0, torch's choice for
    the norm of a zero vector: dividing by Y + [Y = 0] there leaves X dY = 0 instead of 0/0."""
    y, dy = _with_kept_dims(ctx, node, dys[0])
    safe = ctx.emit("Add", [y, ctx.mask(ctx.emit("Equal", [y, ctx.const_like(0.0, y)]))])
    return [ctx.emit("Mul", [node.input[0], ctx.emit("Div", [dy, safe])]), None]


@rule("ReduceLogSumExp")
def reduce_log_sum_exp(ctx, node, dys):
    """Y = log sum exp X: dX = exp(X - Y) dY, the softmax of X over the reduced axes times dY."""
    y, dy = _with_kept_dims(ctx, node, dys[0])
    return [ctx.emit("Mul", [ctx.emit("Exp", [ctx.emit("Sub", [node.input[0], y])]), dy]), None]
