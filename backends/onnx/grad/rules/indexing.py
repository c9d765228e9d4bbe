"""Gradient rules of ops that select values: Slice, Gather, GatherElements.

Each is linear in its data input, y = A x for a 0/1 matrix A, so dx = A^T dy: the selected values'
gradients are put back where they came from, zeros elsewhere, and a value selected several times
(repeated Gather indices) gets the sum. The batch axis stays free, as in shape.py.
"""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError

from ..context import linear, node_label, normalize_axis


def _one_hot(ctx, indices, depth, dtype):
    """indices (computed at run time) as one-hot rows of `depth` along a new last axis."""
    return ctx.emit("OneHot", [indices, ctx.int64s([depth]), ctx.const([0, 1], dtype=dtype)], axis=-1)


# ---- Slice ----------------------------------------------------------------------------------------
def _place_run(ctx, g, rank, shape, axis, positions, dim):
    """Spreads g's entries along axis to the given positions (an arithmetic run) of a zero axis of
    length dim; returns (tensor, its extent along axis, (before, after): the zero padding still to apply).

    shape is g's static shape (only the axes after `axis` are read, never the batch axis)."""
    positions = list(positions)
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    if step < 0:                        # a reversed run: put it back in order first
        g, positions, step = ctx.reverse(g, axis), positions[::-1], -step
    m = len(positions)
    if step > 1:
        # Dilate: (.., m, ..) -> (.., m, 1, ..) -> pad the new axis to step -> (.., m*step, ..), then
        # trim the zeros after the last entry.
        g = ctx.unsqueeze(g, [axis + 1])
        g = ctx.pad(g, rank + 1, {axis + 1: (0, step - 1)})
        g = ctx.reshape(g, [0] * axis + [m * step] + [int(d) for d in shape[axis + 1:]])
        g = ctx.slice(g, [axis], [0], [(m - 1) * step + 1])
    first, span = positions[0], (m - 1) * step + 1
    return g, span, (first, dim - first - span)


def _slice_params(ctx, node):
    """(starts, ends, axes, steps) of a Slice as lists, or None where one is computed at run time."""
    if ctx.opset < 10:
        starts, ends = ctx.attr(node, "starts"), ctx.attr(node, "ends")
        axes = ctx.attr(node, "axes", list(range(len(starts))))
        return list(starts), list(ends), list(axes), [1] * len(starts)
    values = []
    for i in range(1, 5):
        name = node.input[i] if i < len(node.input) else ""
        values.append(None if not name else ctx.const_value(name))
        if name and values[-1] is None:
            values[-1] = "dynamic"
    starts, ends, axes, steps = values
    if isinstance(starts, str) or isinstance(ends, str):
        return None
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    if isinstance(axes, str) or isinstance(steps, str):
        raise MultisalError(f"Slice node {node_label(node)!r}: its axes/steps are computed at run time; "
                            "multisal needs them constant")
    return [int(v) for v in np.ravel(starts)], [int(v) for v in np.ravel(ends)], \
        [int(v) for v in np.ravel(axes)], [int(v) for v in np.ravel(steps)]


@linear("Slice")
def slice_(ctx, node, dy):
    # y = x[start:end:step] per axis: dx is zero but for the sliced positions, which get dy back
    # (in reverse for a negative step, spread `step` apart for a step > 1).
    x = node.input[0]
    in_shape, rank = list(ctx.shape(x)), ctx.rank(x)
    params = _slice_params(ctx, node)
    if params is None:
        return _slice_dynamic(ctx, node, dy)
    starts, ends, axes, steps = params
    g, shape, pads = dy, list(ctx.shape(node.output[0])), {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, rank)
        dim = in_shape[axis]
        positions = list(range(*slice(start, end, step).indices(dim)))  # ONNX clamps like Python
        if not positions:
            return ctx.zeros_like(x)
        if positions == list(range(dim)):
            continue
        g, shape[axis], pads[axis] = _place_run(ctx, g, rank, shape, axis, positions, dim)
    return ctx.pad(g, rank, pads)


def _slice_dynamic(ctx, node, dy):
    """Slice with starts/ends computed at run time: the sliced positions are those of the same Slice
    applied to arange(dim); dy goes back through their one-hot matrix."""
    x = node.input[0]
    rank = ctx.rank(x)
    axes = ctx.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = node.input[4] if len(node.input) > 4 and node.input[4] else None
    if len(node.input) > 3 and node.input[3] and axes is None:
        raise MultisalError(f"Slice node {node_label(node)!r}: its axes are computed at run time; "
                            "multisal needs them constant")
    count = ctx.shape(node.input[1])[0]
    axes = list(range(count)) if axes is None else [int(a) for a in np.ravel(axes)]
    dtype = ctx.np_dtype(x)
    g = dy
    for k in range(count):
        axis = normalize_axis(axes[k], rank)
        dim = ctx.shape(x)[axis]
        pick = [ctx.emit("Slice", [name, ctx.int64s([k]), ctx.int64s([k + 1])]) for name in node.input[1:3]]
        inputs = [ctx.int64s(np.arange(dim)), *pick, ctx.int64s([0])]
        if steps:
            inputs.append(ctx.emit("Slice", [steps, ctx.int64s([k]), ctx.int64s([k + 1])]))
        positions = ctx.emit("Slice", inputs)
        onehot = _one_hot(ctx, positions, dim, dtype)
        g = ctx.contract_axis(g, axis, rank, onehot, dtype)
    return g


# ---- Gather / GatherElements ----------------------------------------------------------------------
@linear("Gather")
def gather(ctx, node, dy):
    # y = x.take(indices, axis): dx = dy contracted with the one-hot matrix of the indices along the
    # axis, so repeated indices add. A scalar index (ViT's class token) is dy padded into place.
    x, indices = node.input
    shape, rank = ctx.shape(x), ctx.rank(x)
    axis = normalize_axis(ctx.attr(node, "axis", 0), rank)
    dim, post = shape[axis], [int(d) for d in shape[axis + 1:]]
    dtype = ctx.np_dtype(x)
    idx = ctx.const_value(indices)
    k = int(np.prod(ctx.shape(indices)))
    g = dy
    if ctx.rank(indices) != 1:   # indices' axes -> one axis of length k
        g = ctx.unsqueeze(g, [axis]) if ctx.rank(indices) == 0 else ctx.reshape(g, [0] * axis + [k] + post)
    if idx is not None:
        idx = np.ravel(idx).astype(np.int64)
        idx = np.where(idx < 0, idx + dim, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= dim):
            raise MultisalError(f"Gather node {node_label(node)!r}: index out of range for axis of length {dim}")
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            return ctx.pad(g, rank, {axis: (int(idx[0]), dim - int(idx[0]) - len(idx))})
        onehot = np.zeros((len(idx), dim), dtype=dtype)
        np.add.at(onehot, (np.arange(len(idx)), idx), 1)
    else:
        onehot = _one_hot(ctx, ctx.reshape(indices, [-1]), dim, dtype)
    return ctx.contract_axis(g, axis, rank, onehot, dtype)


@linear("GatherElements")
def gather_elements(ctx, node, dy):
    # y[.., i, ..] = x[.., indices[.., i, ..], ..]: dx is dy scattered back, adding over repeats
    # (ScatterElements with reduction "add" from opset 16; before it, a one-hot sum over the axis).
    x, indices = node.input
    shape, rank = ctx.shape(x), ctx.rank(x)
    axis = normalize_axis(ctx.attr(node, "axis", 0), rank)
    if ctx.opset >= 16:
        return ctx.emit("ScatterElements", [ctx.zeros_like(x), indices, dy], axis=axis, reduction="add")
    idx = ctx.const_value(indices)
    if idx is not None:
        normalized = np.where(idx < 0, idx + shape[axis], idx)
        if all(len(np.unique(v)) == len(v) for v in np.moveaxis(normalized, axis, -1).reshape(-1, idx.shape[axis])):
            # No index repeats along the axis: a plain scatter is exact.
            return ctx.emit("ScatterElements", [ctx.zeros_like(x), indices, dy], axis=axis)
    dtype = ctx.np_dtype(x)
    onehot = _one_hot(ctx, indices, shape[axis], dtype)
    spread = ctx.emit("Mul", [onehot, ctx.unsqueeze(dy, [rank])])                 # (..idx.., dim)
    summed = ctx.reduce("ReduceSum", spread, [axis], keepdims=True)               # axis -> 1
    perm = list(range(rank + 1))
    perm[axis], perm[rank] = rank, axis
    g = ctx.squeeze(ctx.emit("Transpose", [summed], perm=perm), [rank])
    out = ctx.shape(node.output[0])
    return ctx.pad(g, rank, {a: (0, shape[a] - out[a]) for a in range(rank) if a != axis})
