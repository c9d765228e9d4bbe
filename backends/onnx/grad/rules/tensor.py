"""Gradient rules of ops that select, pad, resize or repeat values.

Every op here is linear in its data input, y = A x for a 0/1 (or interpolation) matrix A, so the
gradient is dx = A^T dy: values that were copied out are put back, and where one value was copied
to several places (Concat of a path with itself, Tile, Expand, edge/reflect padding, repeated
Gather indices, upsampling) the copies' gradients are added. The rules lean on the static shapes of
the probe run but keep the batch axis free: a batch extent is never written into the graph (Reshape
copies it with 0, Slice/Pad address it by index or not at all).
"""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from ..context import rule

onnx = lazy_import("onnx")
ort = lazy_import("onnxruntime")
helper = lazy_import("onnx.helper")
numpy_helper = lazy_import("onnx.numpy_helper")

INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)


# ---- building blocks ------------------------------------------------------------------------------
def _np_dtype(ctx, name):
    return helper.tensor_dtype_to_np_dtype(ctx.dtypes.get(name, onnx.TensorProto.FLOAT))


def _node_label(node):
    return node.name or node.output[0]


def _norm_axis(axis, rank):
    return int(axis) + rank if int(axis) < 0 else int(axis)


def _zeros_like(ctx, name):
    """Zeros shaped like a forward tensor (its batch extent taken at run time)."""
    zero = numpy_helper.from_array(np.zeros(1, dtype=_np_dtype(ctx, name)))
    return ctx.emit("ConstantOfShape", [ctx.emit("Shape", [name])], value=zero)


def _slice(ctx, x, axes, starts, ends, steps=None):
    """x[starts:ends:steps] along axes, as a Slice of the model's opset (inputs from opset 10)."""
    steps = list(steps) if steps is not None else [1] * len(axes)
    if ctx.opset >= 10:
        inputs = [x, ctx.int64s(starts), ctx.int64s(ends), ctx.int64s(axes)]
        if any(s != 1 for s in steps):
            inputs.append(ctx.int64s(steps))
        return ctx.emit("Slice", inputs)
    if any(s != 1 for s in steps):
        raise MultisalError(f"opset {ctx.opset}: Slice has no steps before opset 10")
    return ctx.emit("Slice", [x], starts=[int(s) for s in starts], ends=[int(e) for e in ends],
                    axes=[int(a) for a in axes])


def _reverse(ctx, x, axis):
    # x[::-1] along axis: start at the last element, end clamped to before the first.
    return _slice(ctx, x, [axis], [-1], [INT64_MIN], [-1])


def _pad(ctx, x, rank, pads_by_axis):
    """Zero padding, {axis: (before, after)}, in the model's opset form (pads an input from 11)."""
    pads = [0] * (2 * rank)
    for axis, (before, after) in pads_by_axis.items():
        pads[axis], pads[axis + rank] = int(before), int(after)
    if not any(pads):
        return x
    if ctx.opset >= 11:
        return ctx.emit("Pad", [x, ctx.int64s(pads)])
    return ctx.emit("Pad", [x], pads=pads)


def _reshape(ctx, x, target):
    return ctx.emit("Reshape", [x, ctx.int64s(target)])


def _axis_matrix(ctx, g, axis, rank, matrix, dtype=np.float32):
    """g contracted with a matrix along one axis: out[..., j, ...] = sum_i g[..., i, ...] M[i, j].

    matrix is a numpy array (a constant of the graph) or the name of a 2-D tensor."""
    const = not isinstance(matrix, str)
    if axis == rank - 1:
        return ctx.emit("MatMul", [g, ctx.const(matrix, dtype=dtype) if const else matrix])
    if axis == rank - 2:  # M^T @ g broadcasts over the leading axes
        mt = ctx.const(np.ascontiguousarray(matrix.T), dtype=dtype) if const else \
            ctx.emit("Transpose", [matrix], perm=[1, 0])
        return ctx.emit("MatMul", [mt, g])
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = ctx.emit("Transpose", [g], perm=perm)
    out = ctx.emit("MatMul", [moved, ctx.const(matrix, dtype=dtype) if const else matrix])
    return ctx.emit("Transpose", [out], perm=[int(i) for i in np.argsort(perm)])


def _place_run(ctx, g, rank, shape, axis, positions, dim):
    """Spreads g's entries along axis to the given positions (an arithmetic run) of a zero axis of
    length dim; returns (tensor, its extent along axis, (before, after): the zero padding still to apply).

    shape is g's static shape (only the axes after `axis` are read, never the batch axis)."""
    positions = list(positions)
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    if step < 0:                        # a reversed run: put it back in order first
        g, positions, step = _reverse(ctx, g, axis), positions[::-1], -step
    m = len(positions)
    if step > 1:
        # Dilate: (.., m, ..) -> (.., m, 1, ..) -> pad the new axis to step -> (.., m*step, ..), then
        # trim the zeros after the last entry.
        g = ctx.unsqueeze(g, [axis + 1])
        g = _pad(ctx, g, rank + 1, {axis + 1: (0, step - 1)})
        g = _reshape(ctx, g, [0] * axis + [m * step] + [int(d) for d in shape[axis + 1:]])
        g = _slice(ctx, g, [axis], [0], [(m - 1) * step + 1])
    first, span = positions[0], (m - 1) * step + 1
    return g, span, (first, dim - first - span)


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


# ---- Concat / Split -------------------------------------------------------------------------------
@rule("Concat")
def concat(ctx, node, dys):
    # y = [x_0, x_1, ...] along axis: dx_i is dy's slice at x_i's offset.
    rank = ctx.rank(node.output[0])
    axis = _norm_axis(ctx.attr(node, "axis", 0), rank)
    grads = [None] * len(node.input)
    if axis == 0 and ctx.opset >= 10:
        # The batch axis: offsets from the inputs' run-time extents.
        offset = ctx.int64s([0])
        for i, x in enumerate(node.input):
            extent = _slice(ctx, ctx.emit("Shape", [x]), [0], [0], [1])
            end = ctx.emit("Add", [offset, extent])
            if ctx.needs(node, i):
                grads[i] = ctx.emit("Slice", [dys[0], offset, end, ctx.int64s([0])])
            offset = end
        return grads
    offset = 0
    for i, x in enumerate(node.input):
        extent = ctx.shape(x)[axis]
        if ctx.needs(node, i):
            grads[i] = _slice(ctx, dys[0], [axis], [offset], [offset + extent])
        offset += extent
    return grads


@rule("Split")
def split(ctx, node, dys):
    # x = [y_0, y_1, ...] along axis: dx = Concat(dy_0, dy_1, ...), zeros for outputs not used.
    axis = _norm_axis(ctx.attr(node, "axis", 0), ctx.rank(node.input[0]))
    parts = [dy if dy is not None else _zeros_like(ctx, out) for dy, out in zip(dys, node.output)]
    dx = ctx.emit("Concat", parts, axis=axis) if len(parts) > 1 else parts[0]
    return [dx] + [None] * (len(node.input) - 1)


# ---- Slice ----------------------------------------------------------------------------------------
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
        raise MultisalError(f"Slice node {_node_label(node)!r}: its axes/steps are computed at run time; "
                            "multisal needs them constant")
    return [int(v) for v in np.ravel(starts)], [int(v) for v in np.ravel(ends)], \
        [int(v) for v in np.ravel(axes)], [int(v) for v in np.ravel(steps)]


@rule("Slice")
def slice_(ctx, node, dys):
    # y = x[start:end:step] per axis: dx is zero but for the sliced positions, which get dy back
    # (in reverse for a negative step, spread `step` apart for a step > 1).
    x = node.input[0]
    rest = [None] * (len(node.input) - 1)
    in_shape, rank = list(ctx.shape(x)), ctx.rank(x)
    params = _slice_params(ctx, node)
    if params is None:
        return [_slice_dynamic(ctx, node, dys[0])] + rest
    starts, ends, axes, steps = params
    g, shape, pads = dys[0], list(ctx.shape(node.output[0])), {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _norm_axis(axis, rank)
        dim = in_shape[axis]
        positions = list(range(*slice(start, end, step).indices(dim)))  # ONNX clamps like Python
        if not positions:
            return [_zeros_like(ctx, x)] + rest
        if positions == list(range(dim)):
            continue
        g, shape[axis], pads[axis] = _place_run(ctx, g, rank, shape, axis, positions, dim)
    return [_pad(ctx, g, rank, pads)] + rest


def _slice_dynamic(ctx, node, dy):
    """Slice with starts/ends computed at run time: the sliced positions are those of the same Slice
    applied to arange(dim); dy goes back through their one-hot matrix."""
    x = node.input[0]
    rank = ctx.rank(x)
    axes = ctx.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = node.input[4] if len(node.input) > 4 and node.input[4] else None
    if len(node.input) > 3 and node.input[3] and axes is None:
        raise MultisalError(f"Slice node {_node_label(node)!r}: its axes are computed at run time; "
                            "multisal needs them constant")
    count = ctx.shape(node.input[1])[0]
    axes = list(range(count)) if axes is None else [int(a) for a in np.ravel(axes)]
    dtype = _np_dtype(ctx, x)
    g = dy
    for k in range(count):
        axis = _norm_axis(axes[k], rank)
        dim = ctx.shape(x)[axis]
        pick = [ctx.emit("Slice", [name, ctx.int64s([k]), ctx.int64s([k + 1])]) for name in node.input[1:3]]
        inputs = [ctx.int64s(np.arange(dim)), *pick, ctx.int64s([0])]
        if steps:
            inputs.append(ctx.emit("Slice", [steps, ctx.int64s([k]), ctx.int64s([k + 1])]))
        positions = ctx.emit("Slice", inputs)
        onehot = ctx.emit("OneHot", [positions, ctx.int64s([dim]), ctx.const([0, 1], dtype=dtype)], axis=-1)
        g = _axis_matrix(ctx, g, axis, rank, onehot, dtype)
    return g


# ---- Pad ------------------------------------------------------------------------------------------
def pad_params(ctx, node):
    rank = ctx.rank(node.input[0])
    mode = ctx.attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if ctx.opset < 11:
        pads = ctx.attr(node, "pads", ctx.attr(node, "paddings"))
        axes = list(range(rank))
    else:
        pads = ctx.const_value(node.input[1])
        if pads is None:
            raise MultisalError(f"Pad node {_node_label(node)!r}: its pads are computed at run time; "
                                "multisal needs them constant")
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = ctx.const_value(node.input[3])
            if axes is None:
                raise MultisalError(f"Pad node {_node_label(node)!r}: its axes are computed at run time")
    pads = [int(p) for p in np.ravel(pads)]
    axes = [_norm_axis(a, rank) for a in np.ravel(axes)]
    k = len(axes)
    return mode, rank, {a: (pads[i], pads[i + k]) for i, a in enumerate(axes) if pads[i] or pads[i + k]}


@rule("Pad")
def pad(ctx, node, dys):
    # constant: dx = dy without the border (negative pads crop: their positions get zero).
    # edge/reflect/wrap: y[i] = x[m(i)] per axis; dx[k] = sum of dy[i] over m(i) = k, written as
    # runs of the border (Slice, reversed for reflect, summed for edge) padded into place and added.
    rest = [None] * (len(node.input) - 1)
    if not ctx.needs(node, 0):
        return [None] + rest
    mode, rank, pads = pad_params(ctx, node)
    g = dys[0]
    if mode == "constant":
        axes = sorted(pads)
        starts = [max(pads[a][0], 0) for a in axes]
        ends = [-pads[a][1] if pads[a][1] > 0 else INT64_MAX for a in axes]
        if any(pads[a][0] > 0 or pads[a][1] > 0 for a in axes):
            g = _slice(ctx, g, axes, starts, ends)
        return [_pad(ctx, g, rank, {a: (max(-pads[a][0], 0), max(-pads[a][1], 0)) for a in axes})] + rest
    if mode not in ("edge", "reflect", "wrap"):
        raise MultisalError(f"Pad node {_node_label(node)!r}: no gradient for mode {mode!r}")
    in_shape = ctx.shape(node.input[0])
    for axis in sorted(pads):
        before, after = pads[axis]
        dim = in_shape[axis]
        if before < 0 or after < 0:
            raise MultisalError(f"Pad node {_node_label(node)!r}: negative pads in mode {mode!r} are not supported")
        index_map = [int(v) for v in np.pad(np.arange(dim), (before, after), mode=mode)]
        parts = []
        for start, stop, positions in _runs(index_map):
            part = _slice(ctx, g, [axis], [start], [stop])
            if positions[-1] == positions[0] and len(positions) > 1:   # an edge run: all to one place
                part = ctx.reduce("ReduceSum", part, [axis], keepdims=True)
                positions = positions[:1]
            elif len(positions) > 1 and positions[1] < positions[0]:   # a reflected run
                part, positions = _reverse(ctx, part, axis), positions[::-1]
            lo = positions[0]
            parts.append(_pad(ctx, part, rank, {axis: (lo, dim - 1 - positions[-1])}))
        g = ctx.add_all(parts)
    return [g] + rest


# ---- Gather / GatherElements ----------------------------------------------------------------------
@rule("Gather")
def gather(ctx, node, dys):
    # y = x.take(indices, axis): dx = dy contracted with the one-hot matrix of the indices along the
    # axis, so repeated indices add. A scalar index (ViT's class token) is dy padded into place.
    rest = [None]
    if not ctx.needs(node, 0):
        return [None] + rest
    x, indices = node.input
    shape, rank = ctx.shape(x), ctx.rank(x)
    axis = _norm_axis(ctx.attr(node, "axis", 0), rank)
    dim, post = shape[axis], [int(d) for d in shape[axis + 1:]]
    dtype = _np_dtype(ctx, x)
    idx = ctx.const_value(indices)
    k = int(np.prod(ctx.shape(indices)))
    g = dys[0]
    if ctx.rank(indices) != 1:   # indices' axes -> one axis of length k
        g = ctx.unsqueeze(g, [axis]) if ctx.rank(indices) == 0 else _reshape(ctx, g, [0] * axis + [k] + post)
    if idx is not None:
        idx = np.ravel(idx).astype(np.int64)
        idx = np.where(idx < 0, idx + dim, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= dim):
            raise MultisalError(f"Gather node {_node_label(node)!r}: index out of range for axis of length {dim}")
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            return [_pad(ctx, g, rank, {axis: (int(idx[0]), dim - int(idx[0]) - len(idx))})] + rest
        onehot = np.zeros((len(idx), dim), dtype=dtype)
        np.add.at(onehot, (np.arange(len(idx)), idx), 1)
    else:
        flat = _reshape(ctx, indices, [-1])
        onehot = ctx.emit("OneHot", [flat, ctx.int64s([dim]), ctx.const([0, 1], dtype=dtype)], axis=-1)
    return [_axis_matrix(ctx, g, axis, rank, onehot, dtype)] + rest


@rule("GatherElements")
def gather_elements(ctx, node, dys):
    # y[.., i, ..] = x[.., indices[.., i, ..], ..]: dx is dy scattered back, adding over repeats
    # (ScatterElements with reduction "add" from opset 16; before it, a one-hot sum over the axis).
    rest = [None]
    if not ctx.needs(node, 0):
        return [None] + rest
    x, indices = node.input
    shape, rank = ctx.shape(x), ctx.rank(x)
    axis = _norm_axis(ctx.attr(node, "axis", 0), rank)
    if ctx.opset >= 16:
        return [ctx.emit("ScatterElements", [_zeros_like(ctx, x), indices, dys[0]], axis=axis,
                         reduction="add")] + rest
    idx = ctx.const_value(indices)
    if idx is not None:
        normalized = np.where(idx < 0, idx + shape[axis], idx)
        if all(len(np.unique(v)) == len(v) for v in np.moveaxis(normalized, axis, -1).reshape(-1, idx.shape[axis])):
            # No index repeats along the axis: a plain scatter is exact.
            return [ctx.emit("ScatterElements", [_zeros_like(ctx, x), indices, dys[0]], axis=axis)] + rest
    dtype = _np_dtype(ctx, x)
    onehot = ctx.emit("OneHot", [indices, ctx.int64s([shape[axis]]), ctx.const([0, 1], dtype=dtype)], axis=-1)
    spread = ctx.emit("Mul", [onehot, ctx.unsqueeze(dys[0], [rank])])             # (..idx.., dim)
    summed = ctx.reduce("ReduceSum", spread, [axis], keepdims=True)               # axis -> 1
    perm = list(range(rank + 1))
    perm[axis], perm[rank] = rank, axis
    g = ctx.squeeze(ctx.emit("Transpose", [summed], perm=perm), [rank])
    out = ctx.shape(node.output[0])
    return [_pad(ctx, g, rank, {a: (0, shape[a] - out[a]) for a in range(rank) if a != axis})] + rest


# ---- Expand / Tile --------------------------------------------------------------------------------
@rule("Expand")
def expand(ctx, node, dys):
    # Broadcasting copies: dx sums dy over the broadcast axes.
    return [ctx.unbroadcast(dys[0], node.output[0], node.input[0]) if ctx.needs(node, 0) else None, None]


@rule("Tile")
def tile(ctx, node, dys):
    # y = tile(x, r): y viewed as (r_0, d_0, r_1, d_1, ...) holds a copy of x per tile, so dx is dy
    # in that view summed over the r axes.
    x = node.input[0]
    rest = [None] * (len(node.input) - 1)
    if not ctx.needs(node, 0):
        return [None] + rest
    repeats = ctx.const_value(node.input[1]) if ctx.opset >= 6 else None
    if repeats is None:
        raise MultisalError(f"Tile node {_node_label(node)!r}: its repeats are computed at run time; "
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
        return [dys[0]] + rest
    return [ctx.reduce("ReduceSum", _reshape(ctx, dys[0], target), summed, keepdims=False)] + rest


# ---- Resize / Upsample ----------------------------------------------------------------------------
def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _resize_settings(ctx, node):
    """How a Resize or Upsample node resizes, over all axes: a dict with
      scales   the scales (scales mode) or None
      sizes    the output sizes (sizes mode, "stretch") or None
      roi      starts then ends (2 * rank) or None
      keep     (policy, {axis: size}, axis whose ratio wins) for sizes with a kept aspect ratio
      factor   the factor each axis is resized by (to skip the axes left alone)
    with scales or sizes computed at run time filled in from the probed shapes."""
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    ratio = [np.float32(o) / np.float32(i) if i else 1.0 for o, i in zip(out_shape, in_shape)]
    settings = {"scales": None, "sizes": None, "roi": None, "keep": None, "factor": [float(r) for r in ratio]}
    if node.op_type == "Upsample" or ctx.opset == 10:
        if node.op_type == "Upsample" and ctx.opset < 9:
            scales = ctx.attr(node, "scales")
        else:
            scales = ctx.const_value(node.input[1])
        scales = ratio if scales is None else scales   # computed at run time: the probed ratio
        settings["scales"] = settings["factor"] = [float(v) for v in np.ravel(scales)]
        return settings

    def given(i):
        """(constant value or None, whether it is computed at run time) of input i."""
        name = node.input[i] if i < len(node.input) else ""
        if not name:
            return None, False
        value = ctx.const_value(name)
        if value is None:
            return None, ctx.shape(name) != (0,)
        return (value if value.size else None), False

    roi, roi_dynamic = given(1)
    scales, _ = given(2)
    sizes, sizes_dynamic = given(3)
    axes = ctx.attr(node, "axes") if ctx.opset >= 18 else None
    axes = list(range(rank)) if axes is None else [_norm_axis(a, rank) for a in axes]
    if roi_dynamic and _text(ctx.attr(node, "coordinate_transformation_mode", b"")) == "tf_crop_and_resize":
        raise MultisalError(f"Resize node {_node_label(node)!r}: its roi is computed at run time; "
                            "multisal needs it constant")

    def full(values, fill):
        out = [fill] * rank
        for a, v in zip(axes, np.ravel(values)):
            out[a] = float(v)
        return out

    if roi is not None:
        roi = np.ravel(roi)
        settings["roi"] = full(roi[:len(axes)], 0.0) + full(roi[len(axes):], 1.0)
    if sizes is not None or sizes_dynamic:
        policy = _text(ctx.attr(node, "keep_aspect_ratio_policy", b"stretch"))
        if policy == "stretch" or sizes is None:
            settings["sizes"] = [int(d) for d in out_shape]
            return settings
        # One scale for all the listed axes: the smallest (not_larger) or largest (not_smaller) ratio.
        wanted = {a: int(v) for a, v in zip(axes, np.ravel(sizes))}
        ratios = {a: np.float32(wanted[a]) / np.float32(in_shape[a]) for a in axes}
        pick = min if policy == "not_larger" else max
        winner = pick(axes, key=lambda a: ratios[a])
        settings["keep"] = (policy, wanted, winner)
        settings["factor"] = [float(ratios[winner]) if a in wanted else 1.0 for a in range(rank)]
        return settings
    if scales is None:   # computed at run time: the probed ratio
        settings["scales"] = settings["factor"] = [float(r) for r in ratio]
    else:
        settings["scales"] = settings["factor"] = full(scales, 1.0)
    return settings


def _probe_model(ctx, node, axis, settings):
    """The node's op resizing only `axis` of a small input: (model, input shape).

    The input is 1 along every other axis, except in kept-aspect-ratio mode the axis whose ratio sets
    the common scale, which keeps its extent so the probe resizes by the same scale."""
    rank = ctx.rank(node.input[0])
    in_shape = [1] * rank
    in_shape[axis] = ctx.shape(node.input[0])[axis]
    inits, attrs = [], {}
    for a in node.attribute:
        if a.name not in ("axes", "keep_aspect_ratio_policy", "scales"):
            attrs[a.name] = 0.0 if a.name == "extrapolation_value" else helper.get_attribute_value(a)

    def const(name, values, dtype):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    if settings["scales"] is not None:
        one_axis = [1.0] * rank
        one_axis[axis] = settings["scales"][axis]
    if node.op_type == "Upsample" and ctx.opset < 9:
        inputs, attrs["scales"] = ["x"], one_axis
    elif node.op_type == "Upsample" or ctx.opset == 10:
        inputs = ["x", const("scales", one_axis, np.float32)]
    else:
        roi = settings["roi"]
        if settings["keep"] is not None:
            policy, wanted, winner = settings["keep"]
            probe_axes = [axis] if winner == axis else [axis, winner]
            in_shape[winner] = ctx.shape(node.input[0])[winner]
            attrs["axes"], attrs["keep_aspect_ratio_policy"] = probe_axes, policy
            roi_values = None if roi is None else [roi[a] for a in probe_axes] + [roi[a + rank] for a in probe_axes]
            sizes = [wanted[a] for a in probe_axes]
        else:
            roi_values = None
            if roi is not None:
                roi_values = [0.0] * rank + [1.0] * rank
                roi_values[axis], roi_values[axis + rank] = roi[axis], roi[axis + rank]
            sizes = None
            if settings["sizes"] is not None:
                sizes = [1] * rank
                sizes[axis] = settings["sizes"][axis]
        roi_input = const("roi", [] if roi_values is None else roi_values, np.float32) \
            if roi_values is not None or ctx.opset < 13 else ""
        if sizes is not None:
            scales_input = const("scales", [], np.float32) if ctx.opset < 13 else ""
            inputs = ["x", roi_input, scales_input, const("sizes", sizes, np.int64)]
        else:
            inputs = ["x", roi_input, const("scales", one_axis, np.float32)]
    probe = helper.make_node(node.op_type, inputs, ["y"], **attrs)
    graph = helper.make_graph([probe], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    opset = [helper.make_opsetid("", ctx.opset)]
    model = helper.make_model(graph, opset_imports=opset)
    model.ir_version = helper.find_min_ir_version_for(opset)
    return model, in_shape


def _interpolation_matrix(ctx, node, axis, settings):
    """The (out, in) matrix of the op along one axis, y = A x, read off the op itself run on the
    basis vectors in onnxruntime, so every mode and coordinate transformation is the runtime's own.
    Other axes are 1 long (or held constant) and read at index 0."""

    n, length = ctx.shape(node.input[0])[axis], ctx.shape(node.output[0])[axis]
    model, in_shape = _probe_model(ctx, node, axis, settings)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        columns = []
        for k in range(n):
            basis = np.zeros(in_shape, np.float32)
            np.moveaxis(basis, axis, 0)[k] = 1
            out = session.run(None, {"x": basis})[0]
            columns.append(np.moveaxis(out, axis, 0).reshape(out.shape[axis], -1)[:, 0])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types
        raise MultisalError(f"{node.op_type} node {_node_label(node)!r}: cannot evaluate its interpolation "
                            f"along axis {axis} ({str(error).splitlines()[0]})") from None
    matrix = np.stack(columns, axis=1)
    if matrix.shape != (length, n):
        raise MultisalError(f"{node.op_type} node {_node_label(node)!r}: axis {axis} resized to {matrix.shape[0]} "
                            f"on its own but to {length} in the model; unsupported combination of sizes and modes")
    return matrix


@rule("Resize", "Upsample")
def resize(ctx, node, dys):
    # Separable and linear in x: y = x ×_h A_h ×_w A_w (×_k = along axis k), with A_k the op's
    # interpolation matrix along axis k, read off at build time; dx = dy ×_h A_h^T ×_w A_w^T as
    # MatMuls. Nearest upsampling by whole factors sums each block: an AveragePool times its size.
    x = node.input[0]
    rest = [None] * (len(node.input) - 1)
    if not ctx.needs(node, 0):
        return [None] + rest
    rank = ctx.rank(x)
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    settings = _resize_settings(ctx, node)
    ctm = _text(ctx.attr(node, "coordinate_transformation_mode", b""))
    shifting = node.op_type == "Resize" and ctm in ("tf_half_pixel_for_nn", "tf_crop_and_resize")
    matrices = {}
    for axis in range(rank):
        if in_shape[axis] == out_shape[axis] and settings["factor"][axis] == 1.0 and not shifting:
            continue   # every mode maps an axis kept at scale 1 onto itself
        matrix = _interpolation_matrix(ctx, node, axis, settings)
        if matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(len(matrix))):
            continue
        if axis == 0:
            raise MultisalError(f"{node.op_type} node {_node_label(node)!r}: resizes the batch axis")
        matrices[axis] = matrix
    g = dys[0]
    if not matrices:
        return [g] + rest
    dtype = _np_dtype(ctx, x)
    factors = {a: m.shape[0] // m.shape[1] for a, m in matrices.items()}
    blocks = all(a >= 2 and m.shape[0] == m.shape[1] * factors[a] and
                 np.array_equal(m, np.kron(np.eye(m.shape[1]), np.ones((factors[a], 1)))) for a, m in matrices.items())
    if blocks and 3 <= rank <= 5:
        kernel = [factors.get(a, 1) for a in range(2, rank)]
        pooled = ctx.emit("AveragePool", [g], kernel_shape=kernel, strides=kernel)
        return [ctx.emit("Mul", [pooled, ctx.const(float(np.prod(kernel)), dtype=dtype)])] + rest
    for axis, matrix in matrices.items():
        g = _axis_matrix(ctx, g, axis, rank, matrix, dtype)
    return [g] + rest
