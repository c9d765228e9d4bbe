"""Gradient rules of ops that move, copy or pad values without changing them: Reshape, Flatten,
Squeeze, Unsqueeze, Transpose, Expand, Tile, Concat, Split, Pad, Col2Im.

Every op here is linear in its data input, y = A x for a 0/1 matrix A, so the gradient is
dx = A^T dy: values that were moved are moved back, and where one value was copied to several
places (Concat of a path with itself, Tile, Expand, edge/reflect padding) the copies' gradients
are added, and where several values were added into one (Col2Im's overlapping blocks) each gets
the sum's gradient. The rules lean on the static shapes of the probe run but keep the batch axis free: a
batch extent is never written into the graph (Reshape copies it with 0, Slice/Pad address it by
index or not at all).
"""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError

from ..context import INT64_MAX, linear, node_label, normalize_axis, rule


linear("Reshape", "Flatten", "Squeeze", "Unsqueeze")(lambda ctx, node, dy: ctx.reshape_like(dy, node.input[0]))


@linear("Transpose")
def transpose(ctx, node, dy):
    perm = ctx.attr(node, "perm")
    if perm is None:
        perm = list(range(ctx.rank(node.input[0])))[::-1]
    return ctx.emit("Transpose", [dy], perm=[int(i) for i in np.argsort(perm)])


# ---- Expand / Tile --------------------------------------------------------------------------------
# Broadcasting copies: dx sums dy over the broadcast axes.
linear("Expand")(lambda ctx, node, dy: ctx.unbroadcast(dy, node.output[0], node.input[0]))


@linear("Tile")
def tile(ctx, node, dy):
    # y = tile(x, r): y viewed as (r_0, d_0, r_1, d_1, ...) holds a copy of x per tile, so dx is dy
    # in that view summed over the r axes.
    x = node.input[0]
    repeats = ctx.const_value(node.input[1]) if ctx.opset >= 6 else None
    if repeats is None:
        raise MultisalError(f"Tile node {node_label(node)!r}: its repeats are computed at run time; "
                            "multisal needs them constant")
    repeats = [int(r) for r in np.ravel(repeats)]
    shape = ctx.shape(x)
    target, summed = [], []
    for axis, (r, d) in enumerate(zip(repeats, shape)):
        if r != 1:
            summed.append(len(target))
            target += [r, -1 if axis == 0 else int(d)]
        else:
            target.append(0 if axis == 0 else int(d))   # the batch extent copied at run time
    if not summed:
        return dy
    return ctx.reduce("ReduceSum", ctx.reshape(dy, target), summed, keepdims=False)


# ---- Concat / Split -------------------------------------------------------------------------------
@rule("Concat")
def concat(ctx, node, dys):
    # y = [x_0, x_1, ...] along axis: dx_i is dy's slice at x_i's offset.
    rank = ctx.rank(node.output[0])
    axis = normalize_axis(ctx.attr(node, "axis", 0), rank)
    grads = [None] * len(node.input)
    if axis == 0 and ctx.opset >= 10:
        # The batch axis: offsets from the inputs' run-time extents.
        offset = ctx.int64s([0])
        for i, x in enumerate(node.input):
            extent = ctx.slice(ctx.emit("Shape", [x]), [0], [0], [1])
            end = ctx.emit("Add", [offset, extent])
            if ctx.needs(node, i):
                grads[i] = ctx.emit("Slice", [dys[0], offset, end, ctx.int64s([0])])
            offset = end
        return grads
    offset = 0
    for i, x in enumerate(node.input):
        extent = ctx.shape(x)[axis]
        if ctx.needs(node, i):
            grads[i] = ctx.slice(dys[0], [axis], [offset], [offset + extent])
        offset += extent
    return grads


@rule("Split")
def split(ctx, node, dys):
    # x = [y_0, y_1, ...] along axis: dx = Concat(dy_0, dy_1, ...), zeros for outputs not used.
    axis = normalize_axis(ctx.attr(node, "axis", 0), ctx.rank(node.input[0]))
    parts = [dy if dy is not None else ctx.zeros_like(out) for dy, out in zip(dys, node.output)]
    dx = ctx.emit("Concat", parts, axis=axis) if len(parts) > 1 else parts[0]
    return [dx] + [None] * (len(node.input) - 1)


# ---- Pad ------------------------------------------------------------------------------------------
def _runs(index_map):
    """Splits a map out position -> in position (None = no source) into runs (out_start, out_stop,
    in positions) whose in positions step by +1, -1 or 0."""
    runs, i, n = [], 0, len(index_map)
    while i < n:
        if index_map[i] is None:
            i += 1
            continue
        j, step = i + 1, None
        while j < n and index_map[j] is not None:
            d = index_map[j] - index_map[j - 1]
            if d not in (-1, 0, 1) or (step is not None and d != step):
                break
            step = d
            j += 1
        runs.append((i, j, index_map[i:j]))
        i = j
    return runs


def pad_params(ctx, node):
    rank = ctx.rank(node.input[0])
    mode = ctx.attr(node, "mode", "constant")
    if ctx.opset < 11:
        pads = ctx.attr(node, "pads", ctx.attr(node, "paddings"))
        axes = list(range(rank))
    else:
        pads = ctx.const_value(node.input[1])
        if pads is None:
            raise MultisalError(f"Pad node {node_label(node)!r}: its pads are computed at run time; "
                                "multisal needs them constant")
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = ctx.const_value(node.input[3])
            if axes is None:
                raise MultisalError(f"Pad node {node_label(node)!r}: its axes are computed at run time")
    pads = [int(p) for p in np.ravel(pads)]
    axes = [normalize_axis(a, rank) for a in np.ravel(axes)]
    k = len(axes)
    return mode, rank, {a: (pads[i], pads[i + k]) for i, a in enumerate(axes) if pads[i] or pads[i + k]}


@linear("Pad")
def pad(ctx, node, dy):
    # constant: dx = dy without the border (negative pads crop: their positions get zero).
    # edge/reflect/wrap: y[i] = x[m(i)] per axis; dx[k] = sum of dy[i] over m(i) = k, written as
    # runs of the border (Slice, reversed for reflect, summed for edge) padded into place and added.
    mode, rank, pads = pad_params(ctx, node)
    g = dy
    if mode == "constant":
        axes = sorted(pads)
        starts = [max(pads[a][0], 0) for a in axes]
        ends = [-pads[a][1] if pads[a][1] > 0 else INT64_MAX for a in axes]
        if any(pads[a][0] > 0 or pads[a][1] > 0 for a in axes):
            g = ctx.slice(g, axes, starts, ends)
        return ctx.pad(g, rank, {a: (max(-pads[a][0], 0), max(-pads[a][1], 0)) for a in axes})
    if mode not in ("edge", "reflect", "wrap"):
        raise MultisalError(f"Pad node {node_label(node)!r}: no gradient for mode {mode!r}")
    in_shape = ctx.shape(node.input[0])
    for axis in sorted(pads):
        before, after = pads[axis]
        dim = in_shape[axis]
        if before < 0 or after < 0:
            raise MultisalError(f"Pad node {node_label(node)!r}: negative pads in mode {mode!r} are not supported")
        index_map = [int(v) for v in np.pad(np.arange(dim), (before, after), mode=mode)]
        parts = []
        for start, stop, positions in _runs(index_map):
            part = ctx.slice(g, [axis], [start], [stop])
            if positions[-1] == positions[0] and len(positions) > 1:   # an edge run: all to one place
                part = ctx.reduce("ReduceSum", part, [axis], keepdims=True)
                positions = positions[:1]
            elif len(positions) > 1 and positions[1] < positions[0]:   # a reflected run
                part, positions = ctx.reverse(part, axis), positions[::-1]
            lo = positions[0]
            parts.append(ctx.pad(part, rank, {axis: (lo, dim - 1 - positions[-1])}))
        g = ctx.add_all(parts)
    return g


# ---- Col2Im ---------------------------------------------------------------------------------------
@linear("Col2Im")
def col2im(ctx, node, dy):
    """Y = col2im(X) adds each column of X (C x K values, K the block's size, channel-major as
    torch's fold) into its block of the image, so dX = im2col(dY): the blocks read back, which is
    a grouped Conv of dY with a one-hot kernel per block offset (C*K output channels, the same
    strides, dilations and pads), its output grid flattened into the L columns."""
    image, block = (ctx.const_value(name) for name in node.input[1:3])
    if image is None or block is None:
        raise MultisalError(f"Col2Im node {node_label(node)!r}: its image_shape and block_shape are computed at "
                            "run time; multisal needs them constant")
    block = [int(b) for b in np.ravel(block)]
    channels, size = ctx.shape(node.output[0])[1], int(np.prod(block))
    onehot = np.eye(size, dtype=ctx.np_dtype(node.input[0])).reshape(size, 1, *block)
    spatial = len(block)
    blocks = ctx.emit("Conv", [dy, ctx.const(np.tile(onehot, (channels, 1) + (1,) * spatial), dtype=onehot.dtype)],
                      group=channels, kernel_shape=block,
                      strides=[int(v) for v in ctx.attr(node, "strides", [1] * spatial)],
                      dilations=[int(v) for v in ctx.attr(node, "dilations", [1] * spatial)],
                      pads=[int(v) for v in ctx.attr(node, "pads", [0] * 2 * spatial)])
    return ctx.reshape(blocks, [0, channels * size, -1])
