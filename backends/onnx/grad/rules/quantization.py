"""Gradient rules of quantised ops (QDQ, dynamic and QOperator int8 models): an estimator, not
the derivative.

Quantisation rounds, q = saturate(round(x / s) + zp), a step function whose derivative is zero
almost everywhere, so the exact gradient of a quantised model says nothing. These rules use the
straight-through estimator of quantisation-aware training instead (Bengio, Leonard and Courville
2013; Jacob et al. 2018): rounding is taken for the identity and saturation for a clip, so

    d DequantizeLinear(QuantizeLinear(x)) / dx = [(q_min - zp) s <= x <= (q_max - zp) s],

1 inside the representable range and 0 where x was clipped. What the rules give is the exact
gradient of the model's float equivalent in which each quantise step is that clip, evaluated at
the quantised model's own (rounded) activations.

Conventions:
- The gradient of an integer tensor is taken with respect to its value as a real number (it is
  float, in the type of the scale that goes with it): QuantizeLinear gives dx = dq [inside] / s,
  DequantizeLinear dq = dx s, and MatMulInteger / ConvInteger, which compute exactly in int32,
  are differentiated as the real products they are.
- DequantizeLinear of a constant (a weight, a bias) is a constant: nothing is differentiated
  there. DynamicQuantizeLinear's scale and zero point, computed from its input, are constants of
  the estimator too (its round trip is the identity), so only its quantised output carries a
  gradient: dx = dq / s.
- The ops that compute on quantised tensors (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...)
  are differentiated through their dequantised float equivalent: the inputs dequantised, the
  float op's own rule, and the output's requantisation straight-through with its clipping mask.
  That mask is read off the integer output: a value at q_min or q_max counts as clipped, also
  one that rounded there from within half a step.
- Integer tensors that ops only move (Reshape, Transpose, MaxPool, Concat, ... in QOperator
  models) carry the gradient of the tensor they came from, as float tensors do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from ..context import CONTRIB_OPS, FLOAT_TYPES, RULES, node_label, normalize_axis, rule, rule_for

helper = lazy_import("onnx.helper")
numpy_helper = lazy_import("onnx.numpy_helper")

# onnx.TensorProto's element types (numbers fixed by the ONNX standard) -> (q_min, q_max).
QUANTISED_RANGES = {
    3: (-128, 127), 2: (0, 255), 5: (-32768, 32767), 4: (0, 65535),        # INT8, UINT8, INT16, UINT16
    22: (-8, 7), 21: (0, 15), 26: (-2, 1), 25: (0, 3),                      # INT4, UINT4, INT2, UINT2
    17: (-448.0, 448.0), 18: (-240.0, 240.0),                               # FLOAT8E4M3FN, FLOAT8E4M3FNUZ
    19: (-57344.0, 57344.0), 20: (-57344.0, 57344.0),                       # FLOAT8E5M2, FLOAT8E5M2FNUZ
    23: (-6.0, 6.0),                                                        # FLOAT4E2M1
}
UINT8 = 2
# Ops whose outputs of these indices carry a gradient whatever their element type.
QUANTISED_OUTPUTS = {}
# Ops that only move values: an integer output carries a gradient when a data input of its type does.
MOVES_VALUES = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice",
                "Gather", "Pad", "Expand", "Tile", "MaxPool", "GlobalMaxPool", "Resize", "Upsample",
                "DepthToSpace", "SpaceToDepth"}


def quantised(*op_types, outputs=(0,), contrib=False):
    """Registers the rule of an op whose outputs `outputs` carry a gradient even when they are
    integers; `contrib`: the op (also) lives in onnxruntime's com.microsoft domain."""
    def register(fn):
        for op in op_types:
            QUANTISED_OUTPUTS[op] = tuple(outputs)
            if contrib:
                CONTRIB_OPS.add(op)
        return rule(*op_types)(fn)
    return register


def carries_gradient(node, index, dtypes, depends):
    """Whether output `index` of a node that reads a differentiated tensor depends on it
    differentiably: float outputs do, and integer ones where they stand for real values (a
    quantised op's output, or values an op only moves); shapes, indices and counts never do."""
    if node.op_type in QUANTISED_OUTPUTS and rule_for(node) is not None:
        return index in QUANTISED_OUTPUTS[node.op_type]
    dtype = dtypes.get(node.output[index])
    if dtype in FLOAT_TYPES:
        return True
    return node.op_type in MOVES_VALUES and any(i in depends and dtypes.get(i) == dtype for i in node.input if i)


# ---- building blocks ----------------------------------------------------------------------------
def _input(node, i):
    return node.input[i] if i is not None and i < len(node.input) and node.input[i] else ""


def _quantised_type(ctx, node, zero_point):
    """The element type QuantizeLinear writes: its zero point's, else output_dtype, else uint8."""
    if zero_point:
        return ctx.dtypes[zero_point]
    return int(ctx.attr(node, "output_dtype", 0)) or UINT8


def _q_range(ctx, node, elem_type):
    if elem_type not in QUANTISED_RANGES:
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: no gradient for the quantised type "
                            f"{helper.tensor_dtype_to_string(elem_type)}")
    return QUANTISED_RANGES[elem_type]


def _refuse_blocks(ctx, node):
    if int(ctx.attr(node, "block_size", 0)):
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: blocked quantisation (block_size) of a "
                            "tensor that depends on the input is not supported; per-tensor and per-axis are")


def _along(ctx, name, axis, rank):
    """A scale or zero point broadcastable against a tensor of `rank`: a 1-D one runs along `axis`
    (per-channel), a scalar or one of full rank broadcasts as it is."""
    shape = ctx.shape(name)
    if len(shape) != 1 or rank <= 1 or shape[0] == 1:
        return name
    trailing = rank - 1 - normalize_axis(axis, rank)
    if not trailing:
        return name
    value = ctx.const_value(name)
    if value is not None:
        return ctx.const(value.reshape(-1, *[1] * trailing), dtype=value.dtype)
    return ctx.reshape(name, [-1, *[1] * trailing])


def _broadcast_value(ctx, name, axis, rank):
    """The float64 value of a constant scale or zero point, shaped as _along shapes it; 0 for an
    absent zero point; None where it is computed at run time."""
    if not name:
        return 0.0
    value = ctx.const_value(name)
    if value is None:
        return None
    value = np.asarray(value).astype(np.float64)
    if value.ndim == 1 and rank > 1 and value.size > 1:
        value = value.reshape(-1, *[1] * (rank - 1 - normalize_axis(axis, rank)))
    return value


def _parameter(ctx, name, axis, rank, to):
    """A scale or zero point broadcastable against a tensor of `rank`, in float type `to`."""
    along = _along(ctx, name, axis, rank)
    return along if ctx.dtypes.get(name) == to else ctx.emit("Cast", [along], to=to)


def _constant_real(ctx, q, scale, zero_point, axis, rank, float_type):
    """(q - zp) s (s = 1 where there is no scale) in numpy, q an array, where the scale and the
    zero point are constants; else None."""
    s, zp = _broadcast_value(ctx, scale, axis, rank) if scale else 1.0, _broadcast_value(ctx, zero_point, axis, rank)
    if s is None or zp is None:
        return None
    return ((np.asarray(q).astype(np.float64) - zp) * s).astype(helper.tensor_dtype_to_np_dtype(float_type))


def _written_real(ctx, q, scale, zero_point, axis, rank, float_type):
    """(q - zp) s as nodes, q a tensor name."""
    real = q if ctx.dtypes.get(q) == float_type else ctx.emit("Cast", [q], to=float_type)
    if zero_point:
        real = ctx.emit("Sub", [real, _parameter(ctx, zero_point, axis, rank, float_type)])
    if scale:
        real = ctx.emit("Mul", [real, _parameter(ctx, scale, axis, rank, float_type)])
    return real


def _clip(ctx, x, low, high, dtype):
    """Clip(x, low, high), scalar bounds, in the model's opset form (bounds as inputs from 11)."""
    if ctx.opset >= 11:
        return ctx.emit("Clip", [x, ctx.const(low, dtype=dtype), ctx.const(high, dtype=dtype)])
    return ctx.emit("Clip", [x], min=float(low), max=float(high))


def _inverse(ctx, scale, axis, rank, to):
    """1 / scale, broadcastable against a tensor of `rank`."""
    value = _broadcast_value(ctx, scale, axis, rank)
    if value is not None:
        return ctx.const(1.0 / value, dtype=helper.tensor_dtype_to_np_dtype(to))
    return ctx.emit("Reciprocal", [_parameter(ctx, scale, axis, rank, to)])


def unclipped(ctx, x, clipped, to):
    """[x equals its clipped value] as 0/1 of type `to`, applied with Mul (onnxruntime runs Where
    several times slower)."""
    return ctx.emit("Cast", [ctx.emit("Equal", [clipped, x])], to=to)


def requantisation_mask(ctx, node, y, float_type):
    """[q_min < y < q_max]: the straight-through mask of an output's requantisation, read off the
    integer output y."""
    q_min, q_max = _q_range(ctx, node, ctx.dtypes[y])
    real = ctx.emit("Cast", [y], to=float_type)
    clipped = _clip(ctx, real, q_min + 1, q_max - 1, helper.tensor_dtype_to_np_dtype(float_type))
    return unclipped(ctx, real, clipped, float_type)


# ---- QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear ----------------------------------------
@quantised("QuantizeLinear", contrib=True)
def quantize_linear(ctx, node, dys):
    """dx = dq [(q_min - zp) s <= x <= (q_max - zp) s] / s, per tensor or along `axis`; q_min and
    q_max are those of the quantised type (int8, uint8, int16, int4, float8, ...)."""
    x, scale, zero_point = node.input[0], node.input[1], _input(node, 2)
    _refuse_blocks(ctx, node)
    rank, axis, x_type = ctx.rank(x), int(ctx.attr(node, "axis", 1)), ctx.dtypes[x]
    np_type = helper.tensor_dtype_to_np_dtype(x_type)
    bounds = [_constant_real(ctx, bound, scale, zero_point, axis, rank, x_type)
              for bound in _q_range(ctx, node, _quantised_type(ctx, node, zero_point))]
    if all(b is not None and b.size == 1 for b in bounds):
        clipped = _clip(ctx, x, bounds[0].item(), bounds[1].item(), np_type)
    else:   # per channel, or parameters computed at run time
        low, high = (ctx.const(b, dtype=np_type) if b is not None else
                     _written_real(ctx, ctx.const(bound, dtype=np_type), scale, zero_point, axis, rank, x_type)
                     for b, bound in zip(bounds, _q_range(ctx, node, _quantised_type(ctx, node, zero_point))))
        clipped = ctx.emit("Max", [ctx.emit("Min", [x, high]), low])
    mask = unclipped(ctx, x, clipped, x_type)
    pair = ctx.notes.get(dys[0])
    if pair is not None and pair[1:] == (scale, axis):   # dq = dy s from a DequantizeLinear of q: s / s = 1
        dx = ctx.emit("Mul", [pair[0], mask])
    else:
        dx = ctx.emit("Mul", [ctx.emit("Mul", [dys[0], mask]), _inverse(ctx, scale, axis, rank, x_type)])
    return [dx] + [None] * (len(node.input) - 1)


@rule("DequantizeLinear")
def dequantize_linear(ctx, node, dys):
    """dq = dx s, per tensor or along `axis` (DequantizeLinear of a constant is never differentiated).
    It is written only if read: a QuantizeLinear whose output only this node reads, with the same
    scale (a QDQ pair), takes dx itself, as its 1 / s cancels this s."""
    _refuse_blocks(ctx, node)
    q, scale, axis = node.input[0], node.input[1], int(ctx.attr(node, "axis", 1))
    dq = ctx.tensor_name("scaled")
    ctx.defer(dq, lambda: ctx.nodes.append(helper.make_node("Mul", [dys[0], _along(ctx, scale, axis, ctx.rank(q))],
                                                             [dq], name=dq)))
    ctx.notes[dq] = (dys[0], scale, axis)
    return [dq] + [None] * (len(node.input) - 1)


CONTRIB_OPS.add("DequantizeLinear")


@quantised("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx, node, dys):
    """dx = dq / s: the range it quantises to is the input's own, so nothing is clipped; its
    scale and zero point (outputs 1 and 2) are constants of the estimator."""
    return [ctx.emit("Div", [dys[0], node.output[1]])]


# ---- ops on quantised tensors, through their float equivalents ------------------------------------
@dataclass(frozen=True)
class Operand:
    """Where a quantised operand and its parameters are among a node's inputs (None: absent)."""
    index: int
    scale: Optional[int]
    zero_point: Optional[int]
    axis: int = 1          # the axis a 1-D scale or zero point runs along


def _float_type(ctx, node, operands):
    for o in operands:
        if _input(node, o.scale):
            return ctx.dtypes[_input(node, o.scale)]
    return ctx.float_type


def _dequantised(ctx, node, operand, float_type):
    """The name of operand's real value (q - zp) s, written into the graph only if a rule reads it."""
    q = node.input[operand.index]
    name = ctx.tensor_name("dequantised")
    ctx.shapes[name], ctx.dtypes[name] = ctx.shape(q), float_type
    args = (_input(node, operand.scale), _input(node, operand.zero_point), operand.axis, ctx.rank(q), float_type)
    value = ctx.const_value(q)
    value = None if value is None else _constant_real(ctx, value, *args)
    if value is not None:
        ctx.constants[name] = value
        ctx.defer(name, lambda: ctx.initializers.append(numpy_helper.from_array(value, name)))
    else:
        ctx.defer(name, lambda: ctx.nodes.append(
            helper.make_node("Identity", [_written_real(ctx, q, *args)], [name], name=name)))
    if ctx.needs(node, operand.index):
        ctx.active.add(name)
    return name


def through_float(ctx, node, dys, op_type, operands, output=None, reads_output=False, **attrs):
    """The rule of a quantised node from its float equivalent op_type(dequantised operands,
    attrs): dy of the real output is dy [q_min < y < q_max] / y_s where the output is requantised
    (`output`: the positions of its scale and zero point), the float rule writes the operands'
    real gradients, and each is times its scale (the gradient of its integers). `reads_output`:
    the float rule reads the float output, which is then recomputed from the dequantised operands."""
    float_type = _float_type(ctx, node, operands)
    names = [_dequantised(ctx, node, o, float_type) for o in operands]
    y = node.output[0]
    y_real = ctx.tensor_name(f"{op_type}_output")
    ctx.shapes[y_real], ctx.dtypes[y_real] = ctx.shape(y), float_type
    equivalent = helper.make_node(op_type, names, [y_real], name=node_label(node), **attrs)
    if reads_output:
        def write():
            ctx.ready(names)
            ctx.nodes.append(helper.make_node(op_type, names, [y_real], name=y_real, **attrs))
        ctx.defer(y_real, write)
    dy, y_scale = dys[0], _input(node, output[0]) if output is not None else ""
    if output is not None:
        dy = ctx.emit("Mul", [dy, requantisation_mask(ctx, node, y, float_type)])
    grads = [None] * len(node.input)
    # The float rule is linear in dy: 1 / y_s is applied with each operand's scale, after it.
    for operand, dx in zip(operands, RULES[op_type](ctx, equivalent, [dy])):
        if dx is None or not ctx.needs(node, operand.index):
            continue
        factor = _operand_factor(ctx, node, operand, y_scale, float_type)
        grads[operand.index] = dx if factor is None else ctx.emit("Mul", [dx, factor])
    return grads


def _operand_factor(ctx, node, operand, y_scale, float_type):
    """x_s / y_s for an operand's gradient (1 where there is no scale: None), broadcastable against it."""
    rank = ctx.rank(node.input[operand.index])
    scale = _input(node, operand.scale)
    values = [_broadcast_value(ctx, scale, operand.axis, rank) if scale else 1.0,
              _broadcast_value(ctx, y_scale, 1, rank) if y_scale else 1.0]
    if values[0] is not None and values[1] is not None:
        value = np.asarray(values[0] / values[1])
        return None if np.all(value == 1.0) else ctx.const(value, dtype=helper.tensor_dtype_to_np_dtype(float_type))
    factor = _parameter(ctx, scale, operand.axis, rank, float_type) if scale else None
    if y_scale:
        inverse = _inverse(ctx, y_scale, 1, rank, float_type)
        factor = inverse if factor is None else ctx.emit("Mul", [factor, inverse])
    return factor


def _channels_first(ctx, node):
    if int(ctx.attr(node, "channels_last", 0)):
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: channels_last=1 is not supported")


# Integer matrix products, exact in int32: Y = (A - a_zp)(B - b_zp), per-row a_zp, per-column b_zp.
quantised("MatMulInteger")(lambda ctx, node, dys: through_float(
    ctx, node, dys, "MatMul", [Operand(0, None, 2, axis=-2), Operand(1, None, 3, axis=-1)]))
quantised("ConvInteger")(lambda ctx, node, dys: through_float(
    ctx, node, dys, "Conv", [Operand(0, None, 2), Operand(1, None, 3, axis=0)], **ctx.attributes(node)))
# Requantised outputs: (x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias); the bias is a constant.
quantised("QLinearConv")(lambda ctx, node, dys: through_float(
    ctx, node, dys, "Conv", [Operand(0, 1, 2), Operand(3, 4, 5, axis=0)], output=(6, 7), **ctx.attributes(node)))
quantised("QLinearMatMul")(lambda ctx, node, dys: through_float(
    ctx, node, dys, "MatMul", [Operand(0, 1, 2, axis=-2), Operand(3, 4, 5, axis=-1)], output=(6, 7)))
quantised("QLinearAdd", contrib=True)(lambda ctx, node, dys: through_float(
    ctx, node, dys, "Add", [Operand(0, 1, 2), Operand(3, 4, 5)], output=(6, 7)))
quantised("QLinearMul", contrib=True)(lambda ctx, node, dys: through_float(
    ctx, node, dys, "Mul", [Operand(0, 1, 2), Operand(3, 4, 5)], output=(6, 7)))
quantised("QLinearSigmoid", contrib=True)(lambda ctx, node, dys: through_float(
    ctx, node, dys, "Sigmoid", [Operand(0, 1, 2)], output=(3, 4), reads_output=True))
quantised("QLinearLeakyRelu", contrib=True)(lambda ctx, node, dys: through_float(
    ctx, node, dys, "LeakyRelu", [Operand(0, 1, 2)], output=(3, 4), alpha=float(ctx.attr(node, "alpha", 0.01))))


@quantised("QGemm", contrib=True)
def qgemm(ctx, node, dys):
    """(A, a_s, a_zp, B, b_s, b_zp, C, y_s, y_zp): alpha A' B' + C; without y_s the output is float.
    b's per-channel scale runs along its output axis (0 with transB)."""
    trans_b = int(ctx.attr(node, "transB", 0))
    output = (7, 8) if _input(node, 7) else None
    return through_float(ctx, node, dys, "Gemm", [Operand(0, 1, 2), Operand(3, 4, 5, axis=0 if trans_b else 1)],
                         output=output, **ctx.attributes(node))


@quantised("QLinearGlobalAveragePool", contrib=True)
def qlinear_global_average_pool(ctx, node, dys):
    _channels_first(ctx, node)
    return through_float(ctx, node, dys, "GlobalAveragePool", [Operand(0, 1, 2)], output=(3, 4))


@quantised("QLinearAveragePool", contrib=True)
def qlinear_average_pool(ctx, node, dys):
    _channels_first(ctx, node)
    return through_float(ctx, node, dys, "AveragePool", [Operand(0, 1, 2)], output=(3, 4),
                         **ctx.attributes(node, without=("channels_last",)))


@quantised("QLinearSoftmax", contrib=True)
def qlinear_softmax(ctx, node, dys):
    """Softmax along `axis` (its opset attribute says the softmax of opset 13 on: one axis; the
    older one, over the flattened trailing axes, only where they are one axis)."""
    x = node.input[0]
    axis = normalize_axis(ctx.attr(node, "axis", -1), ctx.rank(x))
    if int(ctx.attr(node, "opset", 13)) < 13 and axis != ctx.rank(x) - 1:
        raise MultisalError(f"QLinearSoftmax node {node_label(node)!r}: the softmax of opsets before 13 over "
                            f"axes {axis}.. is not supported, only over the last axis")
    return through_float(ctx, node, dys, "Softmax", [Operand(0, 1, 2)], output=(3, 4), reads_output=True,
                         axis=axis)


@quantised("QLinearConcat", contrib=True)
def qlinear_concat(ctx, node, dys):
    """(y_s, y_zp, x_1, x_1s, x_1zp, x_2, ...): Concat along `axis`."""
    operands = [Operand(i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
    return through_float(ctx, node, dys, "Concat", operands, output=(0, 1), axis=int(ctx.attr(node, "axis")))


# ---- quantised tensors as layers ------------------------------------------------------------------
# Where the scale and zero point of an op's (integer) output are among its inputs.
OUTPUT_PARAMETERS = {"QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QLinearAdd": (6, 7),
                     "QLinearMul": (6, 7), "QLinearSigmoid": (3, 4), "QLinearLeakyRelu": (3, 4),
                     "QLinearSoftmax": (3, 4), "QLinearGlobalAveragePool": (3, 4), "QLinearAveragePool": (3, 4),
                     "QLinearConcat": (0, 1), "QGemm": (7, 8)}
REAL_PREFIX = "multisal_real:"


def quantised_tensors(model, constants):
    """{tensor: (scale, zero point)} of the integer tensors a QOperator model computes on, each
    standing for the real values (q - zp) s with one constant scale: the outputs of quantised ops
    and what ops that only move values make of them. A Grad-CAM layer may be one of these; the
    backend shows it as those real values and its gradient as the one with respect to them."""
    found = {}
    for node in model.graph.node:
        if rule_for(node) is None or not node.output:
            continue
        if node.op_type in OUTPUT_PARAMETERS:
            scale, zero_point = (_input(node, i) for i in OUTPUT_PARAMETERS[node.op_type])
            if scale and np.size(constants.get(scale, [0, 0])) == 1:
                found[node.output[0]] = (scale, zero_point)
        elif node.op_type in MOVES_VALUES and node.input and node.input[0] in found:
            moved = node.output if node.op_type == "Split" else node.output[:1]   # not MaxPool's indices
            found.update({o: found[node.input[0]] for o in moved if o})
    return found


def real_view(name, scale, zero_point):
    """The node that shows a quantised tensor as its real values, REAL_PREFIX + name."""
    return helper.make_node("DequantizeLinear", [name, scale] + ([zero_point] if zero_point else []),
                            [REAL_PREFIX + name], name=REAL_PREFIX + name)


def quantise_values(value, scale, zero_point, elem_type):
    """Real values as the integers of a quantised tensor: saturate(round(v / s) + zp) (ties to even,
    as QuantizeLinear rounds)."""
    q_min, q_max = QUANTISED_RANGES[elem_type]
    q = np.rint(np.asarray(value, np.float64) / float(np.asarray(scale))) + float(np.asarray(zero_point))
    return np.clip(q, q_min, q_max).astype(helper.tensor_dtype_to_np_dtype(elem_type))


def dequantised_constants(model, constants):
    """{name: value} of each DequantizeLinear of constants (a QDQ model's weights and biases), so
    that rules see those weights as the constants they are (Conv's fast input gradients need
    them). The nodes stay in the forward graph: with float weights in their place onnxruntime
    picks other convolution kernels, whose float rounding moves values across rounding steps of
    the next QuantizeLinear (README, "Quantised and half-precision models"), and the gradient
    graph's forward pass would no longer be the model's."""
    folded = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or rule_for(node) is None \
                or any(i and i not in constants for i in node.input):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("block_size"):
            continue
        q, scale = np.asarray(constants[node.input[0]]), np.asarray(constants[node.input[1]])
        zero_point = np.asarray(constants[node.input[2]]).astype(np.float64) if _input(node, 2) else 0.0
        axis, rank = attrs.get("axis", 1), q.ndim
        trailing = [1] * (rank - 1 - normalize_axis(axis, rank)) if rank else []
        per_axis = scale.ndim == 1 and scale.size > 1
        s64 = scale.astype(np.float64).reshape(-1, *trailing) if per_axis else scale.astype(np.float64)
        if per_axis and np.ndim(zero_point):
            zero_point = zero_point.reshape(-1, *trailing)
        folded[node.output[0]] = ((q.astype(np.float64) - zero_point) * s64).astype(scale.dtype)
    return folded
