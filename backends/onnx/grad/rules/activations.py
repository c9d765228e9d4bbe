"""Gradient rules of activations: the ReLU family, sigmoids and smooth activations, softmax.

Masks are float 0/1 applied with Mul, not Where: onnxruntime runs Where slower, which dominated
the profile of a depthwise network. A node's forward output is reused where it saves work (Relu,
Clip, Sigmoid, Tanh, Softmax, ...). At a kink (x = 0 for LeakyRelu/PRelu/Elu, the corners of
HardSigmoid/HardSwish) the rule takes one of the one-sided derivatives, as frameworks do.
Written for opsets 11 to 21.
"""
from __future__ import annotations

import math

from ..context import elementwise, normalize_axis, rule


# ---- the ReLU family -------------------------------------------------------------------------------

elementwise("Relu", of="y")(lambda ctx, node, y: ctx.positive(y))


@elementwise("Clip", of="y")
def clip(ctx, node, y):
    """Gradient passes strictly inside (min, max); min/max come as attributes (opset < 11) or inputs.

    The test reads the output y, not the input: min < x < max exactly when min < y < max (outside,
    y sits on a bound), and leaving x unread lets onnxruntime fuse the Conv before a ReLU6."""
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
    return None if inside is None else ctx.mask(inside)


@elementwise("LeakyRelu", of="x")
def leaky_relu(ctx, node, x):
    """y = x (x > 0), alpha x otherwise: f' = alpha + (1 - alpha) [x > 0]."""
    alpha = float(ctx.attr(node, "alpha", 0.01))
    return ctx.emit("Add", [ctx.emit("Mul", [ctx.positive(x), ctx.const(1.0 - alpha)]), ctx.const(alpha)])


@rule("PRelu")
def prelu(ctx, node, dys):
    """y = x (x > 0), slope x otherwise, slope broadcasting to x:
    dx = dy * (slope + [x > 0] (1 - slope)); dslope = unbroadcast(dy * x * [x <= 0])."""
    x, slope = node.input[0], node.input[1]
    positive = ctx.positive(x)
    grads = [None, None]
    if ctx.needs(node, 0):
        value = ctx.const_value(slope)
        one_minus = (ctx.const(1.0 - value, dtype=value.dtype) if value is not None
                     else ctx.emit("Sub", [ctx.const(1.0), slope]))
        factor = ctx.emit("Add", [slope, ctx.emit("Mul", [positive, one_minus])])
        grads[0] = ctx.emit("Mul", [dys[0], factor])
    if ctx.needs(node, 1):
        negative_x = ctx.emit("Sub", [x, ctx.emit("Mul", [x, positive])])       # x [x <= 0]
        grads[1] = ctx.unbroadcast(ctx.emit("Mul", [dys[0], negative_x]), node.output[0], slope)
    return grads


@elementwise("Elu", of="y")
def elu(ctx, node, y):
    """y = x (x > 0), alpha (e^x - 1) otherwise: f' = 1 (x > 0), y + alpha otherwise."""
    alpha = float(ctx.attr(node, "alpha", 1.0))
    positive = ctx.positive(node.input[0])
    below = ctx.emit("Add", [y, ctx.const(alpha)])                               # y + alpha = alpha e^x
    return ctx.emit("Add", [below, ctx.emit("Mul", [positive, ctx.emit("Sub", [ctx.const(1.0), below])])])


# ---- sigmoids and smooth activations -----------------------------------------------------------------

# f' = y (1 - y), 1 - y^2, and sigmoid(x) for softplus(x) = log(1 + e^x).
elementwise("Sigmoid", of="y")(lambda ctx, node, y: ctx.emit("Mul", [y, ctx.emit("Sub", [ctx.const(1.0), y])]))
elementwise("Tanh", of="y")(lambda ctx, node, y: ctx.emit("Sub", [ctx.const(1.0), ctx.emit("Mul", [y, y])]))
elementwise("Softplus", of="x")(lambda ctx, node, x: ctx.emit("Sigmoid", [x]))


@elementwise("HardSigmoid", of="y")
def hard_sigmoid(ctx, node, y):
    """y = clip(alpha x + beta, 0, 1): f' = alpha where 0 < y < 1 (0 < alpha x + beta < 1)."""
    alpha = float(ctx.attr(node, "alpha", 0.2))
    inside = ctx.emit("And", [ctx.emit("Greater", [y, ctx.const(0.0)]), ctx.emit("Less", [y, ctx.const(1.0)])])
    return ctx.emit("Mul", [ctx.mask(inside), ctx.const(alpha)])


@elementwise("HardSwish", of="x")
def hard_swish(ctx, node, x):
    """y = x clip(x/6 + 1/2, 0, 1): f' = x/3 + 1/2 for -3 < x < 3, 1 for x >= 3, 0 below."""
    below_top = ctx.emit("Less", [x, ctx.const(3.0)])
    inside = ctx.mask(ctx.emit("And", [ctx.emit("Greater", [x, ctx.const(-3.0)]), below_top]))
    above = ctx.mask(ctx.emit("Not", [below_top]))
    ramp = ctx.emit("Add", [ctx.emit("Mul", [x, ctx.const(1.0 / 3.0)]), ctx.const(0.5)])
    return ctx.emit("Add", [ctx.emit("Mul", [inside, ramp]), above])


@elementwise("Erf", of="x")
def erf(ctx, node, x):
    """f' = 2/sqrt(pi) e^(-x^2)."""
    gauss = ctx.emit("Exp", [ctx.emit("Neg", [ctx.emit("Mul", [x, x])])])
    return ctx.emit("Mul", [gauss, ctx.const(2.0 / math.sqrt(math.pi))])


@elementwise("Gelu", of="x")
def gelu(ctx, node, x):
    """approximate="none": y = x Phi(x), f' = Phi(x) + x phi(x), Phi(x) = (1 + erf(x/sqrt 2))/2,
    phi(x) = e^(-x^2/2)/sqrt(2 pi).
    approximate="tanh": y = x (1 + t)/2, t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3),
    f' = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2)."""
    x2 = ctx.emit("Mul", [x, x])
    if ctx.attr(node, "approximate", "none") == "tanh":
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        inner = ctx.emit("Add", [ctx.emit("Mul", [x2, ctx.const(k)]), ctx.const(1.0)])                # 1 + k x^2
        t = ctx.emit("Tanh", [ctx.emit("Mul", [ctx.emit("Mul", [x, inner]), ctx.const(c)])])
        half_cdf = ctx.emit("Mul", [ctx.emit("Add", [t, ctx.const(1.0)]), ctx.const(0.5)])
        du = ctx.emit("Add", [ctx.emit("Mul", [x2, ctx.const(3.0 * k * c)]), ctx.const(c)])         # du/dx
        sech2 = ctx.emit("Sub", [ctx.const(1.0), ctx.emit("Mul", [t, t])])
        rest = ctx.emit("Mul", [ctx.emit("Mul", [ctx.emit("Mul", [x, sech2]), du]), ctx.const(0.5)])
    else:
        erf_term = ctx.emit("Erf", [ctx.emit("Mul", [x, ctx.const(1.0 / math.sqrt(2.0))])])
        half_cdf = ctx.emit("Mul", [ctx.emit("Add", [erf_term, ctx.const(1.0)]), ctx.const(0.5)])
        pdf = ctx.emit("Exp", [ctx.emit("Mul", [x2, ctx.const(-0.5)])])
        rest = ctx.emit("Mul", [ctx.emit("Mul", [x, pdf]), ctx.const(1.0 / math.sqrt(2.0 * math.pi))])
    return ctx.emit("Add", [half_cdf, rest])


# ---- softmax ------------------------------------------------------------------------------------------

def _softmax_axes(ctx, node):
    """The axes a (Log)Softmax normalises over: from opset 13 the one axis (default -1); before, the
    input is coerced to 2D at axis (default 1), i.e. it normalises over all axes from axis on."""
    rank = ctx.rank(node.input[0])
    axis = normalize_axis(ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1), rank)
    return [axis] if ctx.opset >= 13 else list(range(axis, rank))


@rule("Softmax")
def softmax(ctx, node, dys):
    """dx = y (dy - sum(dy y)) with the sum over the normalised axes."""
    y = node.output[0]
    total = ctx.reduce("ReduceSum", ctx.emit("Mul", [dys[0], y]), _softmax_axes(ctx, node), keepdims=True)
    return [ctx.emit("Mul", [y, ctx.emit("Sub", [dys[0], total])])]


@rule("LogSoftmax")
def log_softmax(ctx, node, dys):
    """dx = dy - e^y sum(dy) with the sum over the normalised axes."""
    total = ctx.reduce("ReduceSum", dys[0], _softmax_axes(ctx, node), keepdims=True)
    return [ctx.emit("Sub", [dys[0], ctx.emit("Mul", [ctx.emit("Exp", [node.output[0]]), total])])]
