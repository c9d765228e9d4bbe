"""Gradient rules of pooling, normalisation, reductions and ConvTranspose.

Windowed pools are differentiated without per-window loops: what each of the K kernel offsets
receives is formed on the whole output grid at once, as (N*C, K, Ho, Wo), and put back in place
by one ConvTranspose with K input channels, one output channel and a fixed kernel (stride, pads
and dilations of the pool) -- a scatter-add that works at every opset. Every rule writes only
ops valid at opsets 11..21.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from ..context import rule

onnx = lazy_import("onnx")


def _auto_pad(ctx, node):
    value = ctx.attr(node, "auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def _label(node):
    return node.name or node.output[0]


def _only_data_input(ctx, node, what="its first input"):
    """The rules below differentiate only the data input; the rest are weights."""
    for i in range(1, len(node.input)):
        if ctx.needs(node, i):
            raise MultisalError(f"{node.op_type} node {_label(node)!r}: input {i} ({node.input[i]!r}) depends on the "
                                f"differentiated tensors; only the gradient through {what} is supported")


# ---- windowed pooling ---------------------------------------------------------------------------

def _pool_geometry(ctx, node):
    """kernel, strides, dilations, begin pads, end pads, input and output spatial sizes of a pool.

    The output size is the probed one (it already says what ceil_mode did); SAME_UPPER puts the
    odd pad at the end, SAME_LOWER at the beginning, as onnxruntime does."""
    in_sp, out_sp = list(ctx.shape(node.input[0])[2:]), list(ctx.shape(node.output[0])[2:])
    spatial = len(in_sp)
    kernel = [int(k) for k in ctx.attr(node, "kernel_shape")]
    strides = [int(s) for s in ctx.attr(node, "strides", [1] * spatial)]
    dilations = [int(d) for d in ctx.attr(node, "dilations", [1] * spatial)]
    auto_pad = _auto_pad(ctx, node)
    pads = ctx.attr(node, "pads")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for k, s, d, n, o in zip(kernel, strides, dilations, in_sp, out_sp):
            total = max((o - 1) * s + (k - 1) * d + 1 - n, 0)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
    elif auto_pad == "VALID" or pads is None:
        begin, end = [0] * spatial, [0] * spatial
    else:
        begin, end = [int(p) for p in pads[:spatial]], [int(p) for p in pads[spatial:]]
    return kernel, strides, dilations, begin, end, in_sp, out_sp


def _place_windows(ctx, node, stacked, onehot, kernel, strides, dilations, begin, in_sp, out_sp):
    """dX from per-window values: `stacked` is (N*C, K, Ho, Wo), `onehot` (K, 1, *kernel) says where
    in the window each of the K channels lands. dX[a*s + t*d - begin] += stacked[k, a] * onehot[k, t];
    returns (N*C, 1, *in_sp)."""
    # With one output channel onnxruntime runs this ConvTranspose several times faster than the
    # equivalent stride-1 Conv (the reverse of what holds for Conv's own gradient).
    covered = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_sp, strides, kernel, dilations)]
    end = [c - b - n for c, b, n in zip(covered, begin, in_sp)]      # window area past the input's end
    # Windows past the end are cropped by the end pads; input rows no window reaches come as output padding.
    out_pad = [max(-e, 0) for e in end]
    if any(p >= max(s, d) for p, s, d in zip(out_pad, strides, dilations)):
        raise MultisalError(f"{node.op_type} node {_label(node)!r}: cannot invert its geometry "
                            f"(input {in_sp}, output {out_sp})")
    return ctx.emit("ConvTranspose", [stacked, ctx.const(onehot)], kernel_shape=kernel, strides=strides,
                    dilations=dilations, pads=list(begin) + [max(e, 0) for e in end], output_padding=out_pad)


def _window_offsets(ctx, node, kernel, strides, dilations, begin, in_sp, out_sp):
    """Where in its window each MaxPool window found its maximum: (N*C, 1, *out_sp) int64 codes,
    equal to codes[k] when it was at offsets[k] (row-major over the kernel). They come from
    onnxruntime's own argmax (the Indices output, flat over N, C and the unpadded input, taken
    from the node when it has one in row-major storage order) minus the window's start, in a
    radix where distinct offsets cannot collide."""
    flat = int(np.prod(in_sp))
    if len(node.output) > 1 and node.output[1] and int(ctx.attr(node, "storage_order", 0)) == 0:
        indices = node.output[1]
    else:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name != "storage_order"}
        indices = ctx.emit("MaxPool", [node.input[0]], outputs=2, **attrs)[1]
    steps = [int(np.prod(in_sp[d + 1:])) for d in range(len(in_sp))]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if all(span <= n for span, n in zip(spans[1:], in_sp[1:])):
        radix = steps                   # the input's own strides: the flat index within one image
        code = ctx.emit("Mod", [indices, ctx.int64s(flat)])
    else:                               # a window wider than the input: decode each coordinate
        radix = [int(np.prod(spans[d + 1:])) for d in range(len(in_sp))]
        terms = []
        for step, n, r in zip(steps, in_sp, radix):
            coord = ctx.emit("Mod", [ctx.emit("Div", [indices, ctx.int64s(step)]) if step > 1 else indices,
                                     ctx.int64s(n)])
            terms.append(ctx.emit("Mul", [coord, ctx.int64s(r)]) if r > 1 else coord)
        code = functools.reduce(lambda a, b: ctx.emit("Add", [a, b]), terms)
    grids = np.meshgrid(*[np.arange(o) * s - b for o, s, b in zip(out_sp, strides, begin)], indexing="ij")
    start = sum(g * r for g, r in zip(grids, radix))
    delta = ctx.emit("Sub", [code, ctx.int64s(start.reshape(1, 1, *out_sp))])
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    codes = [sum(t * d * r for t, d, r in zip(offset, dilations, radix)) for offset in offsets]
    return ctx.emit("Reshape", [delta, ctx.int64s([-1, 1, *out_sp])]), codes, offsets


@rule("MaxPool")
def max_pool(ctx, node, dys):
    """dX[p] = sum of dY[a] over the windows a whose maximum onnxruntime took at p (the first
    maximal element in row-major order, as torch picks it); overlapping windows add. With t_a
    the window offset of each argmax (from MaxPool's Indices), stacked[k, a] = dY[a] * (t_a == k)
    is put in place by _place_windows: a scatter-add without ScatterElements' reduction, which
    came only at opset 16."""
    _only_data_input(ctx, node)
    x = node.input[0]
    kernel, strides, dilations, begin, _end, in_sp, out_sp = _pool_geometry(ctx, node)
    delta, codes, offsets = _window_offsets(ctx, node, kernel, strides, dilations, begin, in_sp, out_sp)
    spatial = len(in_sp)
    hit = ctx.mask(ctx.emit("Equal", [delta, ctx.int64s(np.asarray(codes).reshape(1, -1, *[1] * spatial))]))
    dy1 = ctx.emit("Reshape", [dys[0], ctx.int64s([-1, 1, *out_sp])])
    stacked = ctx.emit("Mul", [hit, dy1])                                # (N*C, K, *out_sp)
    onehot = np.zeros((len(offsets), 1, *kernel), np.float32)
    for n, offset in enumerate(offsets):
        onehot[(n, 0, *offset)] = 1.0
    dx = _place_windows(ctx, node, stacked, onehot, kernel, strides, dilations, begin, in_sp, out_sp)
    return [ctx.reshape_like(dx, x)]


def _average_pool_weights(kernel, strides, dilations, begin, end, in_sp, out_sp, count_include_pad):
    """1 / the divisor of each output position, as onnxruntime, torch and onnx's reference use it:
    the window's taps inside the input (count_include_pad=0) or inside the padded input
    (count_include_pad=1; taps past the end pad, which ceil_mode can make, do not count)."""
    per_axis = []
    for k, s, d, b, e, n, o in zip(kernel, strides, dilations, begin, end, in_sp, out_sp):
        lo, hi = (-b, n + e) if count_include_pad else (0, n)
        taps = (np.arange(o) * s - b)[:, None] + np.arange(k)[None, :] * d
        per_axis.append(((taps >= lo) & (taps < hi)).sum(axis=1))
    count = functools.reduce(np.multiply.outer, per_axis)
    return 1.0 / np.maximum(count, 1)


@rule("AveragePool")
def average_pool(ctx, node, dys):
    """Y[a] = sum of the window of a / count[a], so dX[p] = sum over the windows a holding p of
    dY[a] / count[a]: dY / count put back by _place_windows with a kernel of ones."""
    _only_data_input(ctx, node)
    x = node.input[0]
    kernel, strides, dilations, begin, end, in_sp, out_sp = _pool_geometry(ctx, node)
    inverse = _average_pool_weights(kernel, strides, dilations, begin, end, in_sp, out_sp,
                                    int(ctx.attr(node, "count_include_pad", 0)))
    if np.all(inverse == inverse.flat[0]):
        scale = ctx.const(float(inverse.flat[0]))
    else:
        scale = ctx.const(inverse.reshape(1, 1, *out_sp))
    dy1 = ctx.emit("Reshape", [ctx.emit("Mul", [dys[0], scale]), ctx.int64s([-1, 1, *out_sp])])
    ones = np.ones((1, 1, *kernel), np.float32)
    dx = _place_windows(ctx, node, dy1, ones, kernel, strides, dilations, begin, in_sp, out_sp)
    return [ctx.reshape_like(dx, x)]


@rule("GlobalMaxPool")
def global_max_pool(ctx, node, dys):
    """Y[n,c] = max over the spatial axes; dX = dY at the first maximal element (row-major, as
    MaxPool), found with ArgMax (first index on ties) compared with a constant index range."""
    x = node.input[0]
    size = int(np.prod(ctx.shape(x)[2:]))
    flat = ctx.emit("Reshape", [x, ctx.int64s([0, 0, size])])
    index = ctx.emit("ArgMax", [flat], axis=2, keepdims=1)                       # (N, C, 1)
    first = ctx.mask(ctx.emit("Equal", [ctx.int64s(np.arange(size)), index]))  # (N, C, size)
    dy = ctx.emit("Reshape", [dys[0], ctx.int64s([0, 0, 1])])
    return [ctx.reshape_like(ctx.emit("Mul", [first, dy]), x)]


# ---- reductions ---------------------------------------------------------------------------------

def _reduce_axes(ctx, node):
    """The reduced axes (sorted, non-negative), or None when the node is the identity
    (empty axes with noop_with_empty_axes=1). Axes are an attribute before opset 13 (ReduceSum)
    or 18 (the others), then an optional input; absent or empty means all axes."""
    rank = ctx.rank(node.input[0])
    if ctx.opset >= (13 if node.op_type == "ReduceSum" else 18):
        axes = []
        if len(node.input) > 1 and node.input[1]:
            value = ctx.const_value(node.input[1])
            if value is None:
                raise MultisalError(f"{node.op_type} node {_label(node)!r}: its axes ({node.input[1]!r}) are "
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


def _inverse_count(ctx, x, reduced, axes):
    """1 / the number of elements reduced: a constant, or computed from the sizes when the batch
    axis is among them (the batch is free at run time)."""
    if 0 not in axes:
        shape = ctx.shape(x)
        return ctx.const(1.0 / int(np.prod([shape[a] for a in axes])))
    sizes = [ctx.emit("Cast", [ctx.emit("Size", [t])], to=onnx.TensorProto.FLOAT) for t in (reduced, x)]
    return ctx.emit("Div", sizes)


@rule("ReduceSum")
def reduce_sum(ctx, node, dys):
    """dX = dY broadcast back over the reduced axes."""
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return [dys[0], None]
    dy = _keep_dims(ctx, node, dys[0], axes)
    return [ctx.emit("Expand", [dy, ctx.emit("Shape", [node.input[0]])]), None]


@rule("ReduceMean")
def reduce_mean(ctx, node, dys):
    """dX = dY / M broadcast back over the reduced axes (M = the number of elements reduced)."""
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return [dys[0], None]
    x = node.input[0]
    dy = ctx.emit("Mul", [_keep_dims(ctx, node, dys[0], axes), _inverse_count(ctx, x, node.output[0], axes)])
    return [ctx.emit("Expand", [dy, ctx.emit("Shape", [x])]), None]


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


# ---- normalisation ------------------------------------------------------------------------------

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
    _only_data_input(ctx, node)
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    axes = list(range(2, rank))
    value = ctx.const_value(scale)
    if value is not None:
        scale = ctx.const(value.reshape(-1, *([1] * (rank - 2))), dtype=value.dtype)
    else:
        scale = ctx.unsqueeze(scale, list(range(1, rank - 1)))
    xhat, rstd = _standardize(ctx, x, axes, float(ctx.attr(node, "epsilon", 1e-5)))
    g = ctx.emit("Mul", [dys[0], scale])
    return [_standardize_backward(ctx, g, xhat, rstd, axes), None, None]


@rule("LayerNormalization")
def layer_norm(ctx, node, dys):
    """y = xhat * scale + B, xhat standardised over the axes from `axis` on (opset 17):
    dX = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dY * scale, plus what flows
    through the optional Mean (dMean / M) and InvStdDev (-dInv * rstd^2 * xhat / M) outputs."""
    _only_data_input(ctx, node)
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
        inverse_m = _inverse_count(ctx, x, node.output[extra[0][0]], axes)
        for k, d in extra:
            d = ctx.emit("Mul", [ctx.emit("Reshape", [d, kept]), inverse_m])
            if k == 1:                                          # Mean: d mean / dx = 1 / M
                parts.append(ctx.emit("Expand", [d, ctx.emit("Shape", [x])]))
            else:                                               # InvStdDev: d rstd / dx = -rstd^2 xhat / M
                parts.append(ctx.emit("Neg", [ctx.emit("Mul", [ctx.emit("Mul", [d, ctx.emit("Mul", [rstd, rstd])]),
                                                                xhat])]))
    return [ctx.add_all(parts)] + [None] * (len(node.input) - 1)


# ---- ConvTranspose ------------------------------------------------------------------------------

@rule("ConvTranspose")
def conv_transpose(ctx, node, dys):
    """Y[o, s*i + d*u - pad] += X[c, i] * W[c, o, u] (per group), so dX = Conv(dY, W) with the same
    strides, dilations and group and the begin pads; the end pads are whatever brings the Conv's
    output back to X's size (output_padding and output_shape only add rows no input reaches).
    With output_shape or SAME_*, the total pad is split as onnxruntime does: the odd one at the
    beginning except for SAME_UPPER."""
    _only_data_input(ctx, node, "the data input (X)")
    x, w, y = node.input[0], node.input[1], node.output[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    spatial = len(in_shape) - 2
    kernel = list(ctx.attr(node, "kernel_shape", None) or ctx.shape(w)[2:])
    strides = [int(s) for s in ctx.attr(node, "strides", [1] * spatial)]
    dilations = [int(d) for d in ctx.attr(node, "dilations", [1] * spatial)]
    group = int(ctx.attr(node, "group", 1))
    out_pad = list(ctx.attr(node, "output_padding", [0] * spatial))
    auto_pad = _auto_pad(ctx, node)
    pads = ctx.attr(node, "pads")
    begin = []
    for d in range(spatial):
        full = strides[d] * (in_shape[2 + d] - 1) + out_pad[d] + (kernel[d] - 1) * dilations[d] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") or ctx.attr(node, "output_shape") is not None:
            total = full - out_shape[2 + d]
            begin.append(max(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2, 0))
        elif auto_pad == "VALID" or pads is None:
            begin.append(0)
        else:
            begin.append(int(pads[d]))
    end = []
    for d in range(spatial):
        f = (kernel[d] - 1) * dilations[d] + 1
        e = strides[d] * (in_shape[2 + d] - 1) + f - out_shape[2 + d] - begin[d]
        if e < 0 and out_shape[2 + d] + begin[d] - f < strides[d] * (in_shape[2 + d] - 1) + strides[d]:
            e = 0          # the rows past the last window are dropped by the Conv's floor anyway
        if e < 0:
            raise MultisalError(f"ConvTranspose node {_label(node)!r}: cannot invert its geometry "
                                f"(input {in_shape}, output {out_shape})")
        end.append(e)
    dx = ctx.emit("Conv", [dys[0], w], kernel_shape=kernel, strides=strides, dilations=dilations, group=group,
                  pads=begin + end)
    return [dx] + [None] * (len(node.input) - 1)
