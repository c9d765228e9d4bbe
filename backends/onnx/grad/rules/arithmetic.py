"""Gradient rules of arithmetic: casts and copies, the broadcasting and variadic ops, Where, the
elementwise functions of one tensor (exp, log, powers, ...) and the piecewise constant ones (sign,
rounding), whose gradient is zero almost everywhere.

Masks are float 0/1 applied with Mul, not Where, which onnxruntime runs slower; a node's forward
output is reused where it saves work (Exp, Sqrt, Reciprocal, Div). At Abs's kink the rule takes
0, as frameworks do. Written for opsets 11 to 21.
"""
from __future__ import annotations

import numpy as np

from ..context import FLOAT_TYPES, elementwise, linear, rule, zero


# Dropout is the identity at inference; its mask output carries no gradient.
linear("Identity", "Dropout")(lambda ctx, node, dy: dy)
# Float -> float casts cast the gradient back; a cast of quantised integers (int32 products of
# MatMulInteger) keeps it float. Casts to integers carry none (their outputs are never active).
linear("Cast")(lambda ctx, node, dy: ctx.emit("Cast", [dy], to=ctx.dtypes[node.input[0]])
               if ctx.dtypes[node.input[0]] in FLOAT_TYPES else dy)
linear("Neg")(lambda ctx, node, dy: ctx.emit("Neg", [dy]))
zero("Sign", "Floor", "Ceil", "Round")


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


@rule("Mean")
def mean(ctx, node, dys):
    """dx_i = unbroadcast(dy / n)."""
    if not any(ctx.needs(node, i) for i in range(len(node.input))):
        return [None] * len(node.input)
    dy = dys[0] if len(node.input) == 1 else ctx.emit("Mul", [dys[0], ctx.const(1.0 / len(node.input))])
    return [ctx.unbroadcast(dy, node.output[0], x) if ctx.needs(node, i) else None
            for i, x in enumerate(node.input)]


@rule("Max", "Min")
def max_min(ctx, node, dys):
    """The gradient goes to the inputs equal to the output; where k inputs tie, each gets dy / k (as
    torch.maximum / torch.minimum split a tie between their two operands), so the inputs' gradients
    always sum to dy. dx_i = unbroadcast(dy [x_i = y] / sum_j [x_j = y])."""
    y = node.output[0]
    if len(node.input) == 1:
        return [dys[0]]
    if not any(ctx.needs(node, i) for i in range(len(node.input))):
        return [None] * len(node.input)
    hits = [ctx.mask(ctx.emit("Equal", [x, y])) for x in node.input]
    share = ctx.emit("Div", [dys[0], ctx.emit("Sum", hits)])
    return [ctx.unbroadcast(ctx.emit("Mul", [share, hit]), y, x) if ctx.needs(node, i) else None
            for i, (x, hit) in enumerate(zip(node.input, hits))]


@rule("Where")
def where(ctx, node, dys):
    """y = cond ? X : Y, broadcasting: dX = unbroadcast(dy [cond]), dY = unbroadcast(dy - dy [cond]);
    the condition is boolean and gets none."""
    cond, a, b = node.input
    y = node.output[0]
    picked = ctx.emit("Mul", [dys[0], ctx.mask(cond)])        # shaped like y: dy has y's shape
    da = ctx.unbroadcast(picked, y, a) if ctx.needs(node, 1) else None
    db = ctx.unbroadcast(ctx.emit("Sub", [dys[0], picked]), y, b) if ctx.needs(node, 2) else None
    return [None, da, db]


@rule("Pow")
def pow_(ctx, node, dys):
    """y = a^b, broadcasting: da = dy b a^(b-1); db = dy y log(a) (NaN for a < 0 and at a = 0, as the
    formula says; only formed when the exponent depends on what is differentiated). A constant
    exponent is folded at build time (b = 2 gives 2 a, b = 1 gives 1); an integer exponent (opset
    12+) is cast to the base's type."""
    a, b = node.input
    y = node.output[0]
    grads = [None, None]
    if ctx.needs(node, 0):
        value = ctx.const_value(b)
        if value is not None:
            bv = np.asarray(value, dtype=np.float64)
            if bv.size == 1 and float(bv.reshape(-1)[0]) == 1.0:
                factor = None
            elif bv.size == 1 and float(bv.reshape(-1)[0]) == 2.0:
                factor = ctx.emit("Mul", [a, ctx.const_like(2.0, a)])
            else:
                factor = ctx.emit("Mul", [ctx.emit("Pow", [a, ctx.const_like(bv - 1.0, a)]), ctx.const_like(bv, a)])
        else:
            bf = b if ctx.dtypes.get(b) == ctx.dtypes.get(a) else ctx.emit("Cast", [b], to=ctx.dtypes[a])
            factor = ctx.emit("Mul", [ctx.emit("Pow", [a, ctx.emit("Sub", [bf, ctx.const_like(1.0, a)])]), bf])
        da = dys[0] if factor is None else ctx.emit("Mul", [dys[0], factor])
        grads[0] = ctx.unbroadcast(da, y, a)
    if ctx.needs(node, 1):
        db = ctx.emit("Mul", [ctx.emit("Mul", [dys[0], y]), ctx.emit("Log", [a])])
        grads[1] = ctx.unbroadcast(db, y, b)
    return grads


# The elementwise functions of one tensor: dx = dy * f', f' from x or from the output y.
elementwise("Abs", of="x")(lambda ctx, node, x: ctx.emit("Sign", [x]))                   # f' = sign(x), 0 at 0
elementwise("Exp", of="y")(lambda ctx, node, y: y)                                       # f' = e^x = y
elementwise("Log", of="x", divide=True)(lambda ctx, node, x: x)                          # dx = dy / x
elementwise("Sqrt", of="y")(lambda ctx, node, y: ctx.emit("Div", [ctx.const(0.5), y]))   # f' = 1 / (2 y)
elementwise("Reciprocal", of="y")(lambda ctx, node, y: ctx.emit("Neg", [ctx.emit("Mul", [y, y])]))  # f' = -y^2
