"""Gradient rules of Resize and Upsample.

Both are separable and linear in x, y = x ×_h A_h ×_w A_w (×_k = along axis k), so dx = A^T dy
along each axis, with each interpolation matrix A_k read off the op itself at build time.
"""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from ..context import linear, node_label, normalize_axis

onnx = lazy_import("onnx")
ort = lazy_import("onnxruntime")
helper = lazy_import("onnx.helper")
numpy_helper = lazy_import("onnx.numpy_helper")


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
    axes = list(range(rank)) if axes is None else [normalize_axis(a, rank) for a in axes]
    if roi_dynamic and ctx.attr(node, "coordinate_transformation_mode", "") == "tf_crop_and_resize":
        raise MultisalError(f"Resize node {node_label(node)!r}: its roi is computed at run time; "
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
        policy = ctx.attr(node, "keep_aspect_ratio_policy", "stretch")
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
    inits = []
    attrs = ctx.attributes(node, without=("axes", "keep_aspect_ratio_policy", "scales"))
    if "extrapolation_value" in attrs:
        attrs["extrapolation_value"] = 0.0

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
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: cannot evaluate its interpolation "
                            f"along axis {axis} ({str(error).splitlines()[0]})") from None
    matrix = np.stack(columns, axis=1)
    if matrix.shape != (length, n):
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: axis {axis} resized to {matrix.shape[0]} "
                            f"on its own but to {length} in the model; unsupported combination of sizes and modes")
    return matrix


@linear("Resize", "Upsample")
def resize(ctx, node, dy):
    # Separable and linear in x: y = x ×_h A_h ×_w A_w (×_k = along axis k), with A_k the op's
    # interpolation matrix along axis k, read off at build time; dx = dy ×_h A_h^T ×_w A_w^T as
    # MatMuls. Nearest upsampling by whole factors sums each block: an AveragePool times its size.
    x = node.input[0]
    rank = ctx.rank(x)
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    settings = _resize_settings(ctx, node)
    ctm = ctx.attr(node, "coordinate_transformation_mode", "")
    shifting = node.op_type == "Resize" and ctm in ("tf_half_pixel_for_nn", "tf_crop_and_resize")
    matrices = {}
    for axis in range(rank):
        if in_shape[axis] == out_shape[axis] and settings["factor"][axis] == 1.0 and not shifting:
            continue   # every mode maps an axis kept at scale 1 onto itself
        matrix = _interpolation_matrix(ctx, node, axis, settings)
        if matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(len(matrix))):
            continue
        if axis == 0:
            raise MultisalError(f"{node.op_type} node {node_label(node)!r}: resizes the batch axis")
        matrices[axis] = matrix
    g = dy
    if not matrices:
        return g
    dtype = ctx.np_dtype(x)
    factors = {a: m.shape[0] // m.shape[1] for a, m in matrices.items()}
    blocks = all(a >= 2 and m.shape[0] == m.shape[1] * factors[a] and
                 np.array_equal(m, np.kron(np.eye(m.shape[1]), np.ones((factors[a], 1)))) for a, m in matrices.items())
    if blocks and 3 <= rank <= 5:
        kernel = [factors.get(a, 1) for a in range(2, rank)]
        pooled = ctx.emit("AveragePool", [g], kernel_shape=kernel, strides=kernel)
        return ctx.emit("Mul", [pooled, ctx.const(float(np.prod(kernel)), dtype=dtype)])
    for axis, matrix in matrices.items():
        g = ctx.contract_axis(g, axis, rank, matrix, dtype)
    return g
