"""Gradient rules of elementwise math, activations and softmax.

Written for opsets 11 to 21. Masks are float 0/1 applied with Mul (not Where, which onnxruntime runs
several times slower); a node's forward output is reused where it saves work (Sigmoid, Tanh, Exp,
Sqrt, Reciprocal, Softmax, ...). At a kink (x = 0 for Abs/LeakyRelu/PRelu/Elu, the corners of
HardSigmoid/HardSwish) the rule takes one of the one-sided derivatives, as frameworks do.
"""
from __future__ import annotations

import math

import numpy as np

from multisal.frameworks import lazy_import

from ..context import rule

helper = lazy_import("onnx.helper")


def _one_input(node, dx):
    return [dx] + [None] * (len(node.input) - 1)


def _const_like(ctx, value, like):
    """A constant in the element type of tensor `like` (float32 when unknown)."""
    dtype = ctx.dtypes.get(like)
    return ctx.const(value, dtype=helper.tensor_dtype_to_np_dtype(dtype) if dtype else np.float32)


# ---- the ReLU family -------------------------------------------------------------------------------

@rule("LeakyRelu")
def leaky_relu(ctx, node, dys):
    """y = x (x > 0), alpha x otherwise: dx = dy * (alpha + (1 - alpha) [x > 0])."""
    alpha = float(ctx.attr(node, "alpha", 0.01))
    positive = ctx.mask(ctx.emit("Greater", [node.input[0], ctx.const(0.0)]))
    slope = ctx.emit("Add", [ctx.emit("Mul", [positive, ctx.const(1.0 - alpha)]), ctx.const(alpha)])
    return [ctx.emit("Mul", [dys[0], slope])]


@rule("PRelu")
def prelu(ctx, node, dys):
    """y = x (x > 0), slope x otherwise, slope broadcasting to x:
    dx = dy * (slope + [x > 0] (1 - slope)); dslope = unbroadcast(dy * x * [x <= 0])."""
    x, slope = node.input[0], node.input[1]
    positive = ctx.mask(ctx.emit("Greater", [x, ctx.const(0.0)]))
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


@rule("Elu")
def elu(ctx, node, dys):
    """y = x (x > 0), alpha (e^x - 1) otherwise: dx = dy (x > 0), dy (y + alpha) otherwise."""
    alpha = float(ctx.attr(node, "alpha", 1.0))
    positive = ctx.mask(ctx.emit("Greater", [node.input[0], ctx.const(0.0)]))
    below = ctx.emit("Add", [node.output[0], ctx.const(alpha)])                  # y + alpha = alpha e^x
    factor = ctx.emit("Add", [below, ctx.emit("Mul", [positive, ctx.emit("Sub", [ctx.const(1.0), below])])])
    return [ctx.emit("Mul", [dys[0], factor])]


# ---- sigmoids and smooth activations -----------------------------------------------------------------

@rule("Sigmoid")
def sigmoid(ctx, node, dys):
    """dx = dy y (1 - y)."""
    y = node.output[0]
    return [ctx.emit("Mul", [ctx.emit("Mul", [dys[0], y]), ctx.emit("Sub", [ctx.const(1.0), y])])]


@rule("HardSigmoid")
def hard_sigmoid(ctx, node, dys):
    """y = clip(alpha x + beta, 0, 1): dx = dy alpha where 0 < y < 1 (0 < alpha x + beta < 1)."""
    alpha = float(ctx.attr(node, "alpha", 0.2))
    y = node.output[0]
    inside = ctx.emit("And", [ctx.emit("Greater", [y, ctx.const(0.0)]), ctx.emit("Less", [y, ctx.const(1.0)])])
    return [ctx.emit("Mul", [dys[0], ctx.emit("Mul", [ctx.mask(inside), ctx.const(alpha)])])]


@rule("HardSwish")
def hard_swish(ctx, node, dys):
    """y = x clip(x/6 + 1/2, 0, 1): dx = dy (x/3 + 1/2) for -3 < x < 3, dy for x >= 3, 0 below."""
    x = node.input[0]
    below_top = ctx.emit("Less", [x, ctx.const(3.0)])
    inside = ctx.mask(ctx.emit("And", [ctx.emit("Greater", [x, ctx.const(-3.0)]), below_top]))
    above = ctx.mask(ctx.emit("Not", [below_top]))
    ramp = ctx.emit("Add", [ctx.emit("Mul", [x, ctx.const(1.0 / 3.0)]), ctx.const(0.5)])
    factor = ctx.emit("Add", [ctx.emit("Mul", [inside, ramp]), above])
    return [ctx.emit("Mul", [dys[0], factor])]


@rule("Tanh")
def tanh(ctx, node, dys):
    """dx = dy (1 - y^2)."""
    y = node.output[0]
    return [ctx.emit("Mul", [dys[0], ctx.emit("Sub", [ctx.const(1.0), ctx.emit("Mul", [y, y])])])]


@rule("Softplus")
def softplus(ctx, node, dys):
    """y = log(1 + e^x): dx = dy sigmoid(x)."""
    return [ctx.emit("Mul", [dys[0], ctx.emit("Sigmoid", [node.input[0]])])]


@rule("Erf")
def erf(ctx, node, dys):
    """dx = dy 2/sqrt(pi) e^(-x^2)."""
    x = node.input[0]
    gauss = ctx.emit("Exp", [ctx.emit("Neg", [ctx.emit("Mul", [x, x])])])
    return [ctx.emit("Mul", [dys[0], ctx.emit("Mul", [gauss, ctx.const(2.0 / math.sqrt(math.pi))])])]


@rule("Gelu")
def gelu(ctx, node, dys):
    """approximate="none": y = x Phi(x), dx = dy (Phi(x) + x phi(x)), Phi(x) = (1 + erf(x/sqrt 2))/2,
    phi(x) = e^(-x^2/2)/sqrt(2 pi).
    approximate="tanh": y = x (1 + t)/2, t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3),
    dx = dy ((1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2))."""
    x = node.input[0]
    approximate = ctx.attr(node, "approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    x2 = ctx.emit("Mul", [x, x])
    if approximate == "tanh":
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
    return [ctx.emit("Mul", [dys[0], ctx.emit("Add", [half_cdf, rest])])]


# ---- exp, log, powers -------------------------------------------------------------------------------

@rule("Exp")
def exp(ctx, node, dys):
    """dx = dy y."""
    return [ctx.emit("Mul", [dys[0], node.output[0]])]


@rule("Log")
def log(ctx, node, dys):
    """dx = dy / x."""
    return [ctx.emit("Div", [dys[0], node.input[0]])]


@rule("Sqrt")
def sqrt(ctx, node, dys):
    """dx = dy / (2 y)."""
    return [ctx.emit("Div", [ctx.emit("Mul", [dys[0], ctx.const(0.5)]), node.output[0]])]


@rule("Reciprocal")
def reciprocal(ctx, node, dys):
    """y = 1/x: dx = -dy y^2."""
    y = node.output[0]
    return [ctx.emit("Neg", [ctx.emit("Mul", [dys[0], ctx.emit("Mul", [y, y])])])]


@rule("Abs")
def abs_(ctx, node, dys):
    """dx = dy sign(x) (0 at x = 0)."""
    return [ctx.emit("Mul", [dys[0], ctx.emit("Sign", [node.input[0]])])]


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
                factor = ctx.emit("Mul", [a, _const_like(ctx, 2.0, a)])
            else:
                factor = ctx.emit("Mul", [ctx.emit("Pow", [a, _const_like(ctx, bv - 1.0, a)]), _const_like(ctx, bv, a)])
        else:
            bf = b if ctx.dtypes.get(b) == ctx.dtypes.get(a) else ctx.emit("Cast", [b], to=ctx.dtypes[a])
            factor = ctx.emit("Mul", [ctx.emit("Pow", [a, ctx.emit("Sub", [bf, _const_like(ctx, 1.0, a)])]), bf])
        da = dys[0] if factor is None else ctx.emit("Mul", [dys[0], factor])
        grads[0] = ctx.unbroadcast(da, y, a)
    if ctx.needs(node, 1):
        db = ctx.emit("Mul", [ctx.emit("Mul", [dys[0], y]), ctx.emit("Log", [a])])
        grads[1] = ctx.unbroadcast(db, y, b)
    return grads


# ---- variadic, broadcasting ops -----------------------------------------------------------------------

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


# ---- softmax ------------------------------------------------------------------------------------------

def _softmax_axes(ctx, node):
    """The axes a (Log)Softmax normalises over: from opset 13 the one axis (default -1); before, the
    input is coerced to 2D at axis (default 1), i.e. it normalises over all axes from axis on."""
    rank = ctx.rank(node.input[0])
    axis = int(ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1))
    axis = axis + rank if axis < 0 else axis
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
