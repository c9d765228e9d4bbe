"""Gradient rules of arithmetic and the ReLU family (masks applied with Mul, not Where: onnxruntime
runs Where several times slower, which dominated the profile of a depthwise network)."""
from __future__ import annotations

from ..context import rule


@rule("Identity", "Dropout")
def identity(ctx, node, dys):
    # Dropout is the identity at inference; its mask output carries no gradient.
    return [dys[0]]


@rule("Cast")
def cast(ctx, node, dys):
    # Only float -> float casts carry a gradient (integer outputs are never active); cast it back.
    return [ctx.emit("Cast", [dys[0]], to=ctx.dtypes[node.input[0]])]


@rule("Add", "Sum")
def add(ctx, node, dys):
    """dx_i = dy summed down to x_i's shape (Sum is Add with any number of inputs)."""
    return [ctx.unbroadcast(dys[0], node.output[0], x) if ctx.needs(node, i) else None
            for i, x in enumerate(node.input)]


@rule("Sub")
def sub(ctx, node, dys):
    da = ctx.unbroadcast(dys[0], node.output[0], node.input[0]) if ctx.needs(node, 0) else None
    db = ctx.unbroadcast(ctx.emit("Neg", [dys[0]]), node.output[0], node.input[1]) if ctx.needs(node, 1) else None
    return [da, db]


@rule("Mul")
def mul(ctx, node, dys):
    a, b = node.input
    da = ctx.unbroadcast(ctx.emit("Mul", [dys[0], b]), node.output[0], a) if ctx.needs(node, 0) else None
    db = ctx.unbroadcast(ctx.emit("Mul", [dys[0], a]), node.output[0], b) if ctx.needs(node, 1) else None
    return [da, db]


@rule("Div")
def div(ctx, node, dys):
    a, b = node.input
    da = ctx.unbroadcast(ctx.emit("Div", [dys[0], b]), node.output[0], a) if ctx.needs(node, 0) else None
    db = None
    if ctx.needs(node, 1):
        # d(a/b)/db = -(a/b)/b = -y/b
        db = ctx.unbroadcast(ctx.emit("Neg", [ctx.emit("Mul", [dys[0], ctx.emit("Div", [node.output[0], b])])]),
                             node.output[0], b)
    return [da, db]


@rule("Neg")
def neg(ctx, node, dys):
    return [ctx.emit("Neg", [dys[0]])]


@rule("Relu")
def relu(ctx, node, dys):
    positive = ctx.mask(ctx.emit("Greater", [node.output[0], ctx.const(0.0)]))
    return [ctx.emit("Mul", [dys[0], positive])]


@rule("Clip")
def clip(ctx, node, dys):
    """Gradient passes strictly inside (min, max); min/max come as attributes (opset < 11) or inputs.

    The test reads the output y, not the input: min < x < max exactly when min < y < max (outside,
    y sits on a bound), and leaving x unread lets onnxruntime fuse the Conv before a ReLU6."""
    y = node.output[0]
    if ctx.opset < 11:
        lo, hi = ctx.attr(node, "min"), ctx.attr(node, "max")
        lo = None if lo is None else ctx.const(lo)
        hi = None if hi is None else ctx.const(hi)
    else:
        lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
        hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    inside = None
    for bound, op in ((lo, "Greater"), (hi, "Less")):
        if bound is not None:
            cond = ctx.emit(op, [y, bound])
            inside = cond if inside is None else ctx.emit("And", [inside, cond])
    if inside is None:
        return [dys[0]]
    return [ctx.emit("Mul", [dys[0], ctx.mask(inside)])]

