"""Gradient rules of pooling.

Windowed pools are differentiated without per-window loops: what each of the K kernel offsets
receives is formed on the whole output grid at once, as (N*C, K, Ho, Wo), and put back in place
by one ConvTranspose with K input channels, one output channel and a fixed kernel (stride, pads
and dilations of the pool) -- a scatter-add that works at every opset. Every rule writes only
ops valid at opsets 11..21, and MaxPool's also at 8..10 (its argmax's Indices output came at 8).
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

from multisal.errors import MultisalError

from ..context import linear, node_label, rule


def _pool_geometry(ctx, node):
    """kernel, strides, dilations, begin pads, end pads, input and output spatial sizes of a pool."""
    kernel = [int(k) for k in ctx.attr(node, "kernel_shape")]
    strides, dilations, begin, end = ctx.sliding_window(node, kernel)
    in_sp, out_sp = list(ctx.shape(node.input[0])[2:]), list(ctx.shape(node.output[0])[2:])
    return kernel, strides, dilations, begin, end, in_sp, out_sp


def _place_windows(ctx, node, stacked, onehot, kernel, strides, dilations, begin, in_sp, out_sp):
    """dX from per-window values: `stacked` is (N*C, K, Ho, Wo), `onehot` (K, 1, *kernel) says where
    in the window each of the K channels lands. dX[a*s + t*d - begin] += stacked[k, a] * onehot[k, t];
    returns (N*C, 1, *in_sp)."""
    # With one output channel onnxruntime runs this ConvTranspose faster than the equivalent
    # stride-1 Conv (the reverse of what holds for Conv's own gradient).
    covered = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_sp, strides, kernel, dilations)]
    end = [c - b - n for c, b, n in zip(covered, begin, in_sp)]      # window area past the input's end
    # Windows past the end are cropped by the end pads; input rows no window reaches come as output padding.
    out_pad = [max(-e, 0) for e in end]
    if any(p >= max(s, d) for p, s, d in zip(out_pad, strides, dilations)):
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: cannot invert its geometry "
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
        indices = ctx.emit("MaxPool", [node.input[0]], outputs=2, **ctx.attributes(node, without=("storage_order",)))[1]
    steps = [int(np.prod(in_sp[d + 1:])) for d in range(len(in_sp))]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if all(span <= n for span, n in zip(spans[1:], in_sp[1:])):
        radix = steps                   # the input's own strides: the flat index within one image
        code = ctx.mod(indices, ctx.int64s(flat))
    else:                               # a window wider than the input: decode each coordinate
        radix = [int(np.prod(spans[d + 1:])) for d in range(len(in_sp))]
        terms = []
        for step, n, r in zip(steps, in_sp, radix):
            coord = ctx.mod(ctx.emit("Div", [indices, ctx.int64s(step)]) if step > 1 else indices, ctx.int64s(n))
            terms.append(ctx.emit("Mul", [coord, ctx.int64s(r)]) if r > 1 else coord)
        code = functools.reduce(lambda a, b: ctx.emit("Add", [a, b]), terms)
    grids = np.meshgrid(*[np.arange(o) * s - b for o, s, b in zip(out_sp, strides, begin)], indexing="ij")
    start = sum(g * r for g, r in zip(grids, radix))
    delta = ctx.emit("Sub", [code, ctx.int64s(start.reshape(1, 1, *out_sp))])
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    codes = [sum(t * d * r for t, d, r in zip(offset, dilations, radix)) for offset in offsets]
    return ctx.reshape(delta, [-1, 1, *out_sp]), codes, offsets


@rule("MaxPool")
def max_pool(ctx, node, dys):
    """dX[p] = sum of dY[a] over the windows a whose maximum onnxruntime took at p (the first
    maximal element in row-major order, as torch picks it); overlapping windows add. With t_a
    the window offset of each argmax (from MaxPool's Indices), stacked[k, a] = dY[a] * (t_a == k)
    is put in place by _place_windows: a scatter-add without ScatterElements' reduction, which
    came only at opset 16."""
    x = node.input[0]
    kernel, strides, dilations, begin, _end, in_sp, out_sp = _pool_geometry(ctx, node)
    delta, codes, offsets = _window_offsets(ctx, node, kernel, strides, dilations, begin, in_sp, out_sp)
    spatial = len(in_sp)
    hit = ctx.mask(ctx.emit("Equal", [delta, ctx.int64s(np.asarray(codes).reshape(1, -1, *[1] * spatial))]))
    dy1 = ctx.reshape(dys[0], [-1, 1, *out_sp])
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


@linear("AveragePool")
def average_pool(ctx, node, dy):
    """Y[a] = sum of the window of a / count[a], so dX[p] = sum over the windows a holding p of
    dY[a] / count[a]: dY / count put back by _place_windows with a kernel of ones."""
    x = node.input[0]
    kernel, strides, dilations, begin, end, in_sp, out_sp = _pool_geometry(ctx, node)
    inverse = _average_pool_weights(kernel, strides, dilations, begin, end, in_sp, out_sp,
                                    int(ctx.attr(node, "count_include_pad", 0)))
    if np.all(inverse == inverse.flat[0]):
        scale = ctx.const(float(inverse.flat[0]))
    else:
        scale = ctx.const(inverse.reshape(1, 1, *out_sp))
    dy1 = ctx.reshape(ctx.emit("Mul", [dy, scale]), [-1, 1, *out_sp])
    ones = np.ones((1, 1, *kernel), np.float32)
    dx = _place_windows(ctx, node, dy1, ones, kernel, strides, dilations, begin, in_sp, out_sp)
    return ctx.reshape_like(dx, x)


@rule("GlobalMaxPool")
def global_max_pool(ctx, node, dys):
    """Y[n,c] = max over the spatial axes; dX = dY at the first maximal element (row-major, as
    MaxPool), found with ArgMax (first index on ties) compared with a constant index range."""
    x = node.input[0]
    size = int(np.prod(ctx.shape(x)[2:]))
    flat = ctx.reshape(x, [0, 0, size])
    index = ctx.emit("ArgMax", [flat], axis=2, keepdims=1)                       # (N, C, 1)
    first = ctx.mask(ctx.emit("Equal", [ctx.int64s(np.arange(size)), index]))  # (N, C, size)
    dy = ctx.reshape(dys[0], [0, 0, 1])
    return [ctx.reshape_like(ctx.emit("Mul", [first, dy]), x)]


@linear("GlobalAveragePool")
def global_average_pool(ctx, node, dy):
    x = node.input[0]
    scaled = ctx.emit("Mul", [dy, ctx.const(1.0 / int(np.prod(ctx.shape(x)[2:])))])
    return ctx.expand_like(scaled, x)
