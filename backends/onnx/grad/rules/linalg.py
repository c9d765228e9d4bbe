"""Gradient rules of the linear maps with weights: Conv, ConvTranspose, Gemm, MatMul, Einsum.

Only input gradients are formed; weights are constants of the gradient graph.
"""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError

from ..context import linear, node_label, rule


@linear("Conv")
def conv(ctx, node, dy):
    x, w = node.input[0], node.input[1]
    spatial = ctx.rank(x) - 2
    in_shape, out_shape, kernel = ctx.shape(x), ctx.shape(node.output[0]), ctx.shape(w)[2:]
    strides, dilations, begin, end = ctx.sliding_window(node, kernel)
    pads = begin + end
    group = int(ctx.attr(node, "group", 1))
    wv = ctx.const_value(w)
    unit = all(s == 1 for s in strides) and all(d == 1 for d in dilations)
    if wv is not None and unit:
        # Stride 1: the input gradient is a convolution of dy with the flipped, transposed kernel,
        # padded by k-1-p; onnxruntime runs a Conv much faster than a ConvTranspose.
        c_out, c_in_g = wv.shape[:2]
        wt = wv.reshape(group, c_out // group, c_in_g, *kernel).swapaxes(1, 2)
        wt = wt.reshape(group * c_in_g, c_out // group, *kernel)
        wt = np.flip(wt, axis=tuple(range(2, 2 + spatial)))
        new_pads = [k - 1 - p for k, p in zip(kernel, begin)] + [k - 1 - p for k, p in zip(kernel, end)]
        if all(p >= 0 for p in new_pads):
            dx = ctx.emit("Conv", [dy, ctx.const(np.ascontiguousarray(wt), dtype=wv.dtype)],
                          group=group, pads=new_pads, kernel_shape=list(kernel))
            return dx
    if wv is not None and spatial == 2 and wv.shape[1] == 1 and ctx.opset >= 18 \
            and all(d == 1 for d in dilations):
        dx = _depthwise_strided(ctx, dy, wv, strides, begin, kernel, in_shape, out_shape)
        if dx is not None:
            return dx
    # General case: the transposed convolution, with output_padding making up what a stride dropped.
    out_pad = []
    for d in range(spatial):
        covered = (out_shape[2 + d] - 1) * strides[d] - begin[d] - end[d] + (kernel[d] - 1) * dilations[d] + 1
        extra = in_shape[2 + d] - covered
        if extra < 0 or extra >= max(strides[d], dilations[d]):
            raise MultisalError(f"Conv node {node_label(node)!r}: cannot invert its geometry (input {in_shape}, output {out_shape})")
        out_pad.append(extra)
    dx = ctx.emit("ConvTranspose", [dy, w], group=group, strides=strides, dilations=dilations,
                  pads=pads, output_padding=out_pad, kernel_shape=list(kernel))
    return dx


def _phase_taps(kernel, stride, begin, in_len, out_len):
    """One axis of a strided convolution's input gradient, split by phase: dx[s*m + a] = sum over e
    of dy[m + e] * w[s*(q_a - e) + r_a], with (q_a, r_a) = divmod(a + begin, s) and e in [lo, hi]
    shared by all phases. Returns per phase the weight index of each offset (-1: no tap), the pads
    that make those offsets a stride-1 correlation, and the cells per phase it yields (at least
    ceil(in_len / s); the rest is cropped); None where lo > 0 (dy's first cells unused)."""
    split = [divmod(a + begin, stride) for a in range(stride)]
    lo = min(q - (kernel - 1 - r) // stride for q, r in split)
    hi = max(q for q, _ in split)
    if lo > 0:
        return None
    taps = [[k if 0 <= (k := stride * (q - e) + r) < kernel else -1 for e in range(lo, hi + 1)] for q, r in split]
    pad_end = max(0, -(-in_len // stride) + hi - out_len)
    return taps, -lo, pad_end, out_len + pad_end - hi


def _depthwise_strided(ctx, dy, wv, strides, begin, kernel, in_shape, out_shape):
    """Input gradient of a strided depthwise Conv (one input channel per group) without ConvTranspose,
    which onnxruntime runs group by group, one small transposed convolution per channel (the
    stride-2 depthwise convs of EfficientNet-Lite0 stood out in its gradient graph's profile).
    Polyphase form: each of the s_h*s_w output phases is a stride-1 correlation of dy with a subset
    of the taps, so one grouped Conv writes all phases of channel c as channels c*s_h*s_w + phase,
    and Col2Im with a non-overlapping s_h x s_w block puts phase (a, b) of cell (i, j) at
    (s_h*i + a, s_w*j + b). Returns None where the geometry does not fit (then ConvTranspose)."""
    axes = [_phase_taps(kernel[d], strides[d], begin[d], in_shape[2 + d], out_shape[2 + d]) for d in range(2)]
    if any(a is None for a in axes):
        return None
    (rows, pad_top, pad_bottom, m_h), (cols, pad_left, pad_right, m_w) = axes
    s_h, s_w = strides
    c_in, per_group = in_shape[1], wv.shape[0] // in_shape[1]
    # w[g*per_group + o, 0] feeds input channel g; index -1 picks the appended zero.
    w = np.pad(wv.reshape(c_in, per_group, *kernel), [(0, 0), (0, 0), (0, 1), (0, 1)])
    phases = np.stack([w[:, :, r][:, :, :, c] for r in rows for c in cols], axis=1)
    phases = phases.reshape(c_in * s_h * s_w, per_group, len(rows[0]), len(cols[0]))
    split = ctx.emit("Conv", [dy, ctx.const(np.ascontiguousarray(phases), dtype=wv.dtype)], group=c_in,
                     pads=[pad_top, pad_left, pad_bottom, pad_right], kernel_shape=list(phases.shape[2:]))
    columns = ctx.reshape(split, [0, c_in * s_h * s_w, -1])
    dx = ctx.emit("Col2Im", [columns, ctx.int64s([s_h * m_h, s_w * m_w]), ctx.int64s([s_h, s_w])], strides=[s_h, s_w])
    if (s_h * m_h, s_w * m_w) != tuple(in_shape[2:]):
        dx = ctx.slice(dx, [2, 3], [0, 0], in_shape[2:])
    return dx


@rule("Gemm")
def gemm(ctx, node, dys):
    """Y = alpha * A' B' + beta * C with A' = A or A^T, B' = B or B^T; written with MatMul (Gemm
    before opset 11 requires C)."""
    a, b = node.input[0], node.input[1]
    alpha = float(ctx.attr(node, "alpha", 1.0))
    trans_a, trans_b = int(ctx.attr(node, "transA", 0)), int(ctx.attr(node, "transB", 0))
    dy = dys[0] if alpha == 1.0 else ctx.emit("Mul", [dys[0], ctx.const(alpha)])
    grads = [None] * len(node.input)

    def transposed(name, flag):
        """name if flag else name^T; a constant is transposed once, at build time."""
        if not flag:
            return name
        value = ctx.const_value(name)
        if value is not None:
            return ctx.const(np.ascontiguousarray(value.T), dtype=value.dtype)
        return ctx.emit("Transpose", [name], perm=[1, 0])

    if ctx.needs(node, 0):
        da = ctx.emit("MatMul", [dy, transposed(b, not trans_b)])          # dA' = dY B'^T
        grads[0] = transposed(da, trans_a)
    if ctx.needs(node, 1):
        db = ctx.emit("MatMul", [transposed(a, not trans_a), dy])          # dB' = A'^T dY
        grads[1] = transposed(db, trans_b)
    if len(node.input) > 2 and ctx.needs(node, 2):
        beta = float(ctx.attr(node, "beta", 1.0))
        dc = dys[0] if beta == 1.0 else ctx.emit("Mul", [dys[0], ctx.const(beta)])
        grads[2] = ctx.unbroadcast(dc, node.output[0], node.input[2])
    return grads


def _swap_last(ctx, name):
    rank = ctx.rank(name)
    return ctx.emit("Transpose", [name], perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@rule("MatMul")
def matmul(ctx, node, dys):
    a, b = node.input
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(node.output[0])
    grads = [None, None]
    if ctx.needs(node, 0):
        if rb == 1:      # y = a @ b (vector): dA = dy[..., None] * b
            da = ctx.emit("Mul", [ctx.unsqueeze(dys[0], [ry]), b])
        else:
            dy = dys[0] if ra > 1 else ctx.unsqueeze(dys[0], [ry - 1])
            da = ctx.emit("MatMul", [dy, _swap_last(ctx, b)])
            if ra == 1:
                da = ctx.squeeze(da, [ctx.rank(node.output[0]) - 1 if rb > 1 else 0])
        if 1 < ra < ry:      # a was broadcast over leading batch axes
            da = ctx.reduce("ReduceSum", da, range(ry - ra), keepdims=False)
        grads[0] = da
    if ctx.needs(node, 1):
        if ra == 1 or rb == 1:
            raise MultisalError(f"MatMul node {node_label(node)!r}: gradient of a vector operand that is an activation")
        db = ctx.emit("MatMul", [_swap_last(ctx, a), dys[0]])
        if rb < ry:
            db = ctx.reduce("ReduceSum", db, range(ry - rb), keepdims=False)
        grads[1] = db
    return grads


def _einsum_terms(ctx, node):
    """The subscripts of each operand and of the output, as lists of letters: spaces dropped,
    "..." spelt out as letters the equation does not use (right-aligned, numpy's broadcasting),
    and the implicit output (no "->") made explicit: the ellipsis, then the letters used once, sorted."""
    equation = ctx.attr(node, "equation").replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    unused = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    widths = [ctx.rank(x) - (len(t) - 3) for t, x in zip(terms, node.input) if "..." in t]
    ellipsis = unused[:max(widths, default=0)]

    def spell(term, width):
        head, _, tail = term.partition("...")
        return list(head) + (ellipsis[len(ellipsis) - width:] if "..." in term else []) + list(tail)

    operands = [spell(t, ctx.rank(x) - (len(t) - 3)) for t, x in zip(terms, node.input)]
    if arrow:
        output = spell(rhs, len(ellipsis))
    else:
        letters = [c for t in terms for c in t.replace("...", "")]
        output = ellipsis + sorted(c for c in set(letters) if letters.count(c) == 1)
    return operands, output


@rule("Einsum")
def einsum(ctx, node, dys):
    """y = einsum(x_0, ..., x_k) is linear in each operand: dx_i = einsum(dy, x_j for j != i -> the
    subscripts of x_i). A letter only x_i has was summed over: dx_i is constant along it, so it is
    left out of that einsum and put back with Unsqueeze and Expand. A repeated letter in x_i (a
    diagonal) or an ellipsis axis of x_i that was broadcast is not supported."""
    operands, output = _einsum_terms(ctx, node)
    sizes = {}
    for letters, x in zip(operands + [output], list(node.input) + [node.output[0]]):
        for c, n in zip(letters, ctx.shape(x)):
            sizes[c] = max(sizes.get(c, 1), n)
    grads = [None] * len(node.input)
    for i, x in enumerate(node.input):
        if not ctx.needs(node, i):
            continue
        term = operands[i]
        if len(set(term)) < len(term) or any(n != sizes[c] for c, n in zip(term, ctx.shape(x))):
            raise MultisalError(f"Einsum node {node_label(node)!r}: no gradient for operand {i} "
                                f"({''.join(term)}): a repeated or broadcast subscript")
        others = [t for j, t in enumerate(operands) if j != i]
        seen = set(output).union(*others)
        kept = [c for c in term if c in seen]
        equation = ",".join("".join(t) for t in [output] + others) + "->" + "".join(kept)
        dx = ctx.emit("Einsum", [dys[0]] + [o for j, o in enumerate(node.input) if j != i], equation=equation)
        if len(kept) < len(term):
            dx = ctx.unsqueeze(dx, [k for k, c in enumerate(term) if c not in seen])
            dx = ctx.expand_like(dx, x)
        grads[i] = dx
    return grads


@linear("ConvTranspose")
def conv_transpose(ctx, node, dy):
    """Y[o, s*i + d*u - pad] += X[c, i] * W[c, o, u] (per group), so dX = Conv(dY, W) with the same
    strides, dilations and group and the begin pads; the end pads are whatever brings the Conv's
    output back to X's size (output_padding and output_shape only add rows no input reaches).
    With output_shape or SAME_*, the total pad is split as onnxruntime does: the odd one at the
    beginning except for SAME_UPPER."""
    x, w, y = node.input[0], node.input[1], node.output[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    spatial = len(in_shape) - 2
    kernel = list(ctx.attr(node, "kernel_shape", None) or ctx.shape(w)[2:])
    strides = [int(s) for s in ctx.attr(node, "strides", [1] * spatial)]
    dilations = [int(d) for d in ctx.attr(node, "dilations", [1] * spatial)]
    group = int(ctx.attr(node, "group", 1))
    out_pad = list(ctx.attr(node, "output_padding", [0] * spatial))
    auto_pad = ctx.attr(node, "auto_pad", "NOTSET")
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
            raise MultisalError(f"ConvTranspose node {node_label(node)!r}: cannot invert its geometry "
                                f"(input {in_shape}, output {out_shape})")
        end.append(e)
    dx = ctx.emit("Conv", [dy, w], kernel_shape=kernel, strides=strides, dilations=dilations, group=group,
                  pads=begin + end)
    return dx
