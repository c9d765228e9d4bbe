"""Every gradient rule of the ONNX backend with the inputs to check it on: one or more cases per op
type, from which tests/backends/onnx/test_rules_table.py builds a small model (the case's nodes
from the input "x" to a feature map "h", then onnx_fd.classifier_head) and checks the gradient
graph's input gradient against float64 finite differences at each of the case's opsets.

Inputs are drawn away from every kink of the case's ops (finite differences mean nothing there)
and inside their domains. A new rule needs a case here: the table's test fails without one.
The deeper checks of a rule (geometries, opset forms, ties, oracles other than onnx's reference
evaluator) live in test_rules_<module>.py.
"""
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnx_fd import check_input_gradient, draw_distinct, draw_uniform, ints, make_model, model_with_head, opsets_from

SHAPE = (2, 2, 3, 3)
TARGET = (1, 2)
WEIGHTS = np.random.default_rng(5)


def normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def uniform(low, high, kinks=(), ok=None):
    return lambda rng, shape: draw_uniform(rng, low, high, shape, kinks, ok)


def distinct(spacing=0.05):
    return lambda rng, shape: draw_distinct(rng, shape, spacing)


@dataclass(frozen=True)
class Case:
    op: str                                # the op type whose rule the case checks
    nodes: Tuple                           # from "x" to "h"
    input_shape: Tuple[int, ...] = SHAPE
    initializers: Mapping = field(default_factory=dict)
    opsets: Tuple[int, ...] = (17,)
    draw: Callable = normal                # (rng, shape) -> the input
    label: str = ""                        # tells the cases of one op apart
    # Quantised cases: the float equivalent from "x" to "h" whose finite differences the gradient
    # (a straight-through estimate) must match, each quantise step a clip.
    reference: Tuple = ()

    def name(self, opset):
        return "-".join([self.op] + ([self.label] if self.label else []) + [str(opset)])


def node(op, *inputs, out="h", **attrs):
    return helper.make_node(op, list(inputs), [out] if isinstance(out, str) else list(out), **attrs)


def unary(op, first=11, low=-2, high=2, kinks=(), ok=None, label="", **attrs):
    """The op alone on x, at its first opset (11 at the earliest), 13 and 21."""
    return Case(op, (node(op, "x", **attrs),), opsets=tuple(opsets_from(first)), draw=uniform(low, high, kinks, ok),
                label=label)


def weights(*shape):
    return WEIGHTS.standard_normal(shape) * 0.3


GAP = node("GlobalAveragePool", "x", out="g")    # a second, broadcast operand that depends on x

# ---- quantised cases: each quantised op between a QuantizeLinear of x and a DequantizeLinear to h,
# against its float equivalent with each quantise step a clip. Scales are powers of two and inputs
# on the input's quantisation grid where the op is nonlinear, so the dequantised input is x itself
# and the rule's derivative is taken at the same point as the reference's.
MS = "com.microsoft"
INT8, UINT8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8


def grid(step, low, high, kinks=()):
    """Multiples of step in [low, high], at least 0.02 from every kink."""
    def draw(rng, shape):
        while True:
            x = (rng.integers(round(low / step), round(high / step) + 1, shape) * step).astype(np.float32)
            if all(np.abs(x - k).min() > 0.02 for k in kinks):
                return x
    return draw


def q_params(prefix, scale, zero_point, dtype=np.int8):
    """{prefix_s: scale, prefix_z: zero point} as initializers."""
    return {f"{prefix}_s": np.asarray(scale, np.float32), f"{prefix}_z": np.asarray(zero_point, dtype)}


def bounds(scale, zero_point, dtype=np.int8):
    """The representable range ((q_min - zp) s, (q_max - zp) s), per channel where scale is a vector."""
    info = np.iinfo(dtype)
    scale, zero_point = np.asarray(scale, np.float64), np.asarray(zero_point, np.float64)
    return (info.min - zero_point) * scale, (info.max - zero_point) * scale


def quantised(op, inputs, out="yq", domain=MS, **attrs):
    return node(op, *inputs, out=out, domain=domain, **attrs)


def q_case(op, body, reference, initializers, draw, opsets=(13,), label="", input_shape=SHAPE):
    """x quantised as x_s/x_z, the body from "xq" to "yq", "yq" dequantised with y_s/y_z into h."""
    nodes = (node("QuantizeLinear", "x", "x_s", "x_z", out="xq"), *body, node("DequantizeLinear", "yq", "y_s", "y_z"))
    return Case(op, nodes, input_shape, initializers, opsets, draw, label, tuple(reference))


def weights_q(shape, low=-40, high=40, dtype=np.int8):
    return WEIGHTS.integers(low, high + 1, shape).astype(dtype)


Q_CONV_W, Q_CONV_WS = weights_q((3, 2, 3, 3)), np.array([0.01, 0.02, 0.015], np.float32)
Q_CONV_B = WEIGHTS.integers(-500, 500, 3).astype(np.int32)
Q_DEPTHWISE_W = weights_q((4, 1, 3, 3))
Q_MATMUL_W, Q_MATMUL_WS = weights_q((3, 4), 100, 160, np.uint8), np.array([0.01, 0.02, 0.015, 0.03], np.float32)
Q_GEMM_W, Q_GEMM_WS = weights_q((4, 18)), np.array([0.01, 0.02, 0.015, 0.03], np.float32)
Q_GEMM_C = WEIGHTS.integers(-500, 500, 4).astype(np.int32)
X16 = q_params("x", 1 / 16, 0)      # int8, range [-8, 7.94]: the inputs' grid, nothing clipped
X16_U = q_params("x", 1 / 16, 128, np.uint8)
AXIS_S, AXIS_Z = np.array([1 / 32, 1 / 16]), np.array([100, 140])
AXIS_LOW, AXIS_HIGH = bounds(AXIS_S, AXIS_Z, np.uint8)
AXIS_INITS = {"s": AXIS_S, "z": AXIS_Z.astype(np.uint8), "lo_c": AXIS_LOW.reshape(2, 1, 1),
              "hi_c": AXIS_HIGH.reshape(2, 1, 1)}
Q_GEMM_REAL = {"W_real": Q_GEMM_W * Q_GEMM_WS.reshape(4, 1), "C_real": Q_GEMM_C * Q_GEMM_WS / 16}


def float_tensor(value, elem_type):
    return helper.make_tensor("t", elem_type, np.shape(value), np.ravel(value).tolist())

PER_CHANNEL = np.array([0.3, -0.2]).reshape(2, 1, 1)

CASES = [
    # ---- arithmetic
    Case("Identity", (node("Identity", "x"),)),
    Case("Dropout", (node("Dropout", "x"),)),
    Case("Cast", (node("Cast", "x", out="d", to=onnx.TensorProto.DOUBLE),
                  node("Cast", "d", to=onnx.TensorProto.FLOAT))),
    Case("Add", (GAP, node("Add", "x", "g"))),
    Case("Sum", (GAP, node("Sum", "x", "g", "c")), initializers={"c": np.array([0.1, 0.2, 0.3])}),
    Case("Sub", (GAP, node("Sub", "g", "x"))),
    Case("Mul", (GAP, node("Mul", "x", "g"))),
    Case("Div", (node("Sigmoid", "x", out="s"), node("Div", "x", "s"))),
    Case("Neg", (node("Neg", "x"),)),
    Case("Mean", (GAP, node("Mean", "x", "g"))),
    Case("Max", (node("Max", "x", "c"),), initializers={"c": PER_CHANNEL}, draw=uniform(-2, 2, (0.3, -0.2))),
    Case("Min", (node("Min", "x", "c"),), initializers={"c": PER_CHANNEL}, draw=uniform(-2, 2, (0.3, -0.2))),
    Case("Where", (node("Cast", "ci", out="cond", to=onnx.TensorProto.BOOL), GAP, node("Where", "cond", "x", "g")),
         initializers={"ci": np.array([[1], [0], [1]], np.int64)}),
    Case("Pow", (node("Pow", "x", "e"),), initializers={"e": np.array([2.5, -1.5]).reshape(2, 1, 1)},
         draw=uniform(0.3, 2)),
    unary("Exp", high=1.5),
    unary("Log", low=0.3, high=3),
    unary("Sqrt", low=0.3, high=3),
    unary("Reciprocal", kinks=(-0.3, 0, 0.3), ok=lambda v: np.abs(v).min() > 0.3),
    unary("Abs", kinks=(0,)),
    # x times a piecewise constant function of x: dx = dy f(x), the product rule's other term is 0
    Case("Sign", (node("Sign", "x", out="s"), node("Mul", "x", "s")), draw=uniform(-2, 2, (0,))),
    Case("Floor", (node("Floor", "x", out="s"), node("Mul", "x", "s")), draw=uniform(-2.5, 2.5, (-2, -1, 0, 1, 2))),
    Case("Ceil", (node("Ceil", "x", out="s"), node("Mul", "x", "s")), draw=uniform(-2.5, 2.5, (-2, -1, 0, 1, 2))),
    Case("Round", (node("Round", "x", out="s"), node("Mul", "x", "s")),
         draw=uniform(-2.4, 2.4, (-1.5, -0.5, 0.5, 1.5))),
    # only through Floor: the input's gradient is zeros
    Case("Floor", (node("Floor", "x"),), draw=uniform(-2.5, 2.5, (-2, -1, 0, 1, 2)), label="alone"),
    # ---- activations
    unary("Relu", kinks=(0,)),
    Case("Clip", (node("Clip", "x", "lo", "hi"),), initializers={"lo": -0.5, "hi": 0.7},
         draw=uniform(-2, 2, (-0.5, 0.7))),
    unary("LeakyRelu", kinks=(0,), alpha=0.1),
    Case("PRelu", (node("PRelu", "x", "s"),), initializers={"s": np.array([0.25, -0.4]).reshape(2, 1, 1)},
         draw=uniform(-2, 2, (0,))),
    unary("Elu", kinks=(0,), alpha=0.7),
    unary("Sigmoid", low=-3, high=3),
    unary("HardSigmoid", low=-4, high=4, kinks=(-2.5, 2.5)),
    unary("HardSigmoid", low=-3, high=3, kinks=(-1.2, 0.8), label="alpha-beta", alpha=0.5, beta=0.6),
    unary("HardSwish", first=14, low=-5, high=5, kinks=(-3, 3)),
    unary("Tanh"),
    unary("Softplus", low=-3, high=3),
    unary("Erf"),
    unary("Gelu", first=20, low=-3, high=3),
    unary("Gelu", first=20, low=-3, high=3, label="tanh", approximate="tanh"),
    Case("Softmax", (node("Softmax", "x", axis=1),), opsets=(13,)),
    Case("LogSoftmax", (node("LogSoftmax", "x", axis=2),), opsets=(13,)),
    # ---- linalg
    Case("Conv", (node("Conv", "x", "W", "b", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),),
         initializers={"W": weights(3, 2, 3, 3), "b": weights(3)}),
    Case("Conv", (node("Conv", "x", "W", strides=[2, 2], pads=[1, 0, 1, 1], kernel_shape=[3, 3]),), (2, 2, 5, 6),
         initializers={"W": weights(3, 2, 3, 3)}, label="strided"),
    Case("ConvTranspose",
         (node("ConvTranspose", "x", "W", "b", strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0]),),
         initializers={"W": weights(2, 3, 3, 3), "b": weights(3)}),
    Case("Gemm", (node("Flatten", "x", out="flat"), node("Gemm", "flat", "W", "b", transB=1, alpha=0.5)),
         initializers={"W": weights(4, 18), "b": weights(4)}),
    Case("MatMul", (node("MatMul", "x", "W"),), initializers={"W": weights(3, 4)}),
    Case("Einsum", (node("Einsum", "x", "W", equation="nchw,cd->ndhw"),), initializers={"W": weights(2, 4)}),
    # ---- recurrent: x (N, I, T) as sequences (T, N, I), then Y (T, D, N, H) with the batch first
    Case("LSTM", (node("Transpose", "x", out="X", perm=[2, 0, 1]), node("LSTM", "X", "W", "R", "B", out="Y", hidden_size=3),
                  node("Transpose", "Y", perm=[2, 0, 1, 3])), (2, 3, 4), opsets=(11,),
         initializers={"W": weights(1, 12, 3), "R": weights(1, 12, 3), "B": weights(1, 24)}),
    Case("LSTM", (node("Transpose", "x", out="X", perm=[2, 0, 1]),
                  node("LSTM", "X", "W", "R", "B", out=("Y", "Yh"), hidden_size=3, direction="bidirectional"),
                  node("Transpose", "Yh", perm=[1, 0, 2])), (2, 3, 4), opsets=(14,), label="bidirectional-last-state",
         initializers={"W": weights(2, 12, 3), "R": weights(2, 12, 3), "B": weights(2, 24)}),
    Case("GRU", (node("Transpose", "x", out="X", perm=[2, 0, 1]), node("GRU", "X", "W", "R", "B", out="Y", hidden_size=3),
                 node("Transpose", "Y", perm=[2, 0, 1, 3])), (2, 3, 4), opsets=(11,),
         initializers={"W": weights(1, 9, 3), "R": weights(1, 9, 3), "B": weights(1, 18)}),
    Case("GRU", (node("Transpose", "x", out="X", perm=[2, 0, 1]),
                 node("GRU", "X", "W", "R", "B", out="Y", hidden_size=3, direction="reverse", linear_before_reset=1),
                 node("Transpose", "Y", perm=[2, 0, 1, 3])), (2, 3, 4), opsets=(14,), label="reverse-torch",
         initializers={"W": weights(1, 9, 3), "R": weights(1, 9, 3), "B": weights(1, 18)}),
    # ---- pooling
    Case("MaxPool", (node("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),), (2, 2, 5, 5),
         draw=distinct()),
    Case("AveragePool", (node("AveragePool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),),
         (2, 2, 5, 5)),
    Case("GlobalAveragePool", (node("GlobalAveragePool", "x"),)),
    Case("GlobalMaxPool", (node("GlobalMaxPool", "x"),), draw=distinct()),
    # ---- normalization
    Case("BatchNormalization", (node("BatchNormalization", "x", "s", "b", "m", "v", epsilon=1e-3),),
         initializers={"s": np.array([0.7, 1.6]), "b": np.array([0.1, -0.3]), "m": np.array([0.2, -0.4]),
                       "v": np.array([0.6, 1.8])}),
    Case("InstanceNormalization", (node("InstanceNormalization", "x", "s", "b", epsilon=1e-3),),
         initializers={"s": np.array([0.7, 1.6]), "b": np.array([0.1, -0.3])}, draw=distinct(0.1)),
    Case("LayerNormalization", (node("LayerNormalization", "x", "s", "b", axis=1, epsilon=1e-3),),
         initializers={"s": 1 + weights(2, 3, 3), "b": weights(2, 3, 3)}, draw=distinct(0.1)),
    # ---- reductions
    Case("ReduceSum", (node("ReduceSum", "x", "axes", keepdims=0),), initializers={"axes": ints(2, 3)}),
    Case("ReduceMean", (node("ReduceMean", "x", axes=[1, 3]),)),
    Case("ReduceMax", (node("ReduceMax", "x", axes=[2], keepdims=0),), draw=distinct()),
    Case("ReduceL2", (node("ReduceL2", "x", axes=[1], keepdims=1),), opsets=(13,)),
    Case("ReduceL2", (node("ReduceL2", "x", "axes", keepdims=0),), initializers={"axes": ints(2, 3)}, opsets=(18,),
         label="axes-input"),
    Case("ReduceL1", (node("ReduceL1", "x", "axes"),), initializers={"axes": ints(-1)}, opsets=(18,),
         draw=uniform(-2, 2, (0,))),
    Case("ReduceSumSquare", (node("ReduceSumSquare", "x", axes=[1, 2]),), opsets=(13,)),
    Case("ReduceLogSumExp", (node("ReduceLogSumExp", "x", "axes", keepdims=0),), initializers={"axes": ints(1)},
         opsets=(18,)),
    # ---- shape
    Case("Reshape", (node("Reshape", "x", "shape"),), initializers={"shape": ints(0, 3, 6)}),
    Case("Flatten", (node("Flatten", "x"),)),
    Case("Squeeze", (node("Squeeze", "x", "axes"),), (2, 3, 1, 4), initializers={"axes": ints(2)}),
    Case("Unsqueeze", (node("Unsqueeze", "x", "axes"),), initializers={"axes": ints(1)}),
    Case("Transpose", (node("Transpose", "x", perm=[0, 3, 1, 2]),)),
    Case("Expand", (node("Expand", "x", "shape"),), (2, 3, 1, 1), initializers={"shape": ints(1, 3, 2, 4)}),
    Case("Tile", (node("Tile", "x", "r"),), (2, 2, 3, 2), initializers={"r": ints(1, 2, 1, 3)}),
    Case("Concat", (node("Concat", "x", "c", "x", axis=1),), initializers={"c": weights(2, 1, 3, 3)}),
    Case("Split", (node("Split", "x", "sizes", out=("a", "b"), axis=2), node("Concat", "b", "a", "b", axis=2)),
         initializers={"sizes": ints(2, 1)}),
    Case("Pad", (node("Pad", "x", "pads", mode="reflect"),), initializers={"pads": ints(0, 0, 1, 2, 0, 0, 2, 1)}),
    Case("Col2Im", (node("Col2Im", "x", "image", "block"),), (2, 8, 9), initializers={"image": ints(4, 4), "block": ints(2, 2)},
         opsets=(18,)),
    Case("Col2Im", (node("Col2Im", "x", "image", "block", strides=[2, 2], pads=[1, 1, 1, 1]),), (2, 18, 9),
         initializers={"image": ints(5, 6), "block": ints(3, 3)}, opsets=(18,), label="strided"),
    Case("Col2Im", (node("Col2Im", "x", "image", "block", dilations=[2, 1]),), (2, 8, 9),
         initializers={"image": ints(5, 4), "block": ints(2, 2)}, opsets=(18,), label="dilated"),
    # ---- indexing
    Case("Slice", (node("Slice", "x", "starts", "ends", "axes", "steps"),), (2, 2, 7, 6),
         initializers={"starts": ints(-1, 1), "ends": ints(-100, -1), "axes": ints(2, 3), "steps": ints(-2, 2)}),
    Case("Gather", (node("Gather", "x", "i", axis=2),), (2, 2, 4, 3), initializers={"i": ints(1, -1, 1)}),
    Case("GatherElements", (node("GatherElements", "x", "i", axis=2),), (2, 2, 3, 2),
         initializers={"i": np.broadcast_to(ints(0, 2, 2, 1).reshape(2, 2), (2, 2, 2, 2)).copy()}),
    # ---- quantization: QDQ round trips against a clip to the representable range
    Case("QuantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q"), node("DequantizeLinear", "q", "s", "z")),
         initializers={"s": np.float32(1 / 32), "z": np.int8(3), "lo": bounds(1 / 32, 3)[0], "hi": bounds(1 / 32, 3)[1]},
         opsets=(11, 13, 21), label="int8",
         draw=uniform(-6, 6, bounds(1 / 32, 3)), reference=(node("Clip", "x", "lo", "hi"),)),
    Case("QuantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q", axis=1),
                            node("DequantizeLinear", "q", "s", "z", axis=1)),
         initializers=AXIS_INITS, opsets=(13, 21), label="uint8-axis",
         draw=uniform(-6, 6, (*AXIS_LOW, *AXIS_HIGH)),
         reference=(node("Min", "x", "hi_c", out="m"), node("Max", "m", "lo_c"))),
    Case("QuantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q"), node("DequantizeLinear", "q", "s", "z")),
         initializers={"s": np.float32(1 / 1024), "z": np.int16(0), "lo16": -32.0, "hi16": 32767 / 1024},
         opsets=(21,), label="int16",
         draw=uniform(-40, 40, bounds(1 / 1024, 0, np.int16)), reference=(node("Clip", "x", "lo16", "hi16"),)),
    Case("QuantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q"), node("DequantizeLinear", "q", "s", "z")),
         initializers={"s": np.float32(1 / 4), "z": helper.make_tensor("z", onnx.TensorProto.INT4, [], [0]),
                       "lo4": -2.0, "hi4": 1.75},
         opsets=(21,), label="int4", draw=uniform(-3, 3, (-2, 1.75)), reference=(node("Clip", "x", "lo4", "hi4"),)),
    Case("QuantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q"), node("DequantizeLinear", "q", "s", "z")),
         initializers={"s": np.float32(1 / 64), "z": float_tensor(0.0, onnx.TensorProto.FLOAT8E4M3FN),
                       "lo8": -7.0, "hi8": 7.0},
         opsets=(19, 21), label="float8", draw=uniform(-10, 10, (-7, 7)), reference=(node("Clip", "x", "lo8", "hi8"),)),
    Case("QuantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q"), node("DequantizeLinear", "q", "s", "z")),
         initializers={"s": np.float32(1 / 4), "z": helper.make_tensor("z", onnx.TensorProto.UINT4, [], [8]),
                       "lo4": -2.0, "hi4": 1.75},
         opsets=(21,), label="uint4", draw=uniform(-3, 3, (-2, 1.75)), reference=(node("Clip", "x", "lo4", "hi4"),)),
    Case("QuantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q"), node("DequantizeLinear", "q", "s", "z")),
         initializers={"s": np.float32(1 / 8192), "z": float_tensor(0.0, onnx.TensorProto.FLOAT8E5M2),
                       "lo8": -7.0, "hi8": 7.0},
         opsets=(21,), label="float8e5m2", draw=uniform(-10, 10, (-7, 7)), reference=(node("Clip", "x", "lo8", "hi8"),)),
    # integers moved while quantised (Transpose), dequantised along the axis the channels went to
    Case("DequantizeLinear", (node("QuantizeLinear", "x", "s", "z", out="q", axis=1),
                              node("Transpose", "q", out="t", perm=[0, 2, 3, 1]),
                              node("DequantizeLinear", "t", "s", "z", axis=3)),
         initializers=AXIS_INITS, opsets=(13, 21),
         draw=uniform(-6, 6, (*AXIS_LOW, *AXIS_HIGH)),
         reference=(node("Min", "x", "hi_c", out="m"), node("Max", "m", "lo_c", out="c"),
                    node("Transpose", "c", perm=[0, 2, 3, 1]))),
    Case("DynamicQuantizeLinear", (node("DynamicQuantizeLinear", "x", out=("q", "qs", "qz")),
                                   node("DequantizeLinear", "q", "qs", "qz")),
         reference=(node("Identity", "x"),)),
    # dynamic quantisation as onnxruntime writes it: integer product, Cast, times both scales
    Case("MatMulInteger", (node("DynamicQuantizeLinear", "x", out=("q", "qs", "qz")),
                           node("MatMulInteger", "q", "Wq", "qz", "Wz", out="p"),
                           node("Cast", "p", out="pf", to=onnx.TensorProto.FLOAT), node("Mul", "qs", "Ws", out="m"),
                           node("Mul", "pf", "m")),
         initializers={"Wq": Q_MATMUL_W, "Wz": np.uint8(130), "Ws": np.float32(0.02), "W_real": (Q_MATMUL_W - 130.0) * 0.02},
         reference=(node("MatMul", "x", "W_real"),)),
    Case("ConvInteger", (node("DynamicQuantizeLinear", "x", out=("q", "qs", "qz")),
                         node("ConvInteger", "q", "Wq", "qz", "Wz", out="p", pads=[1, 1, 1, 1], strides=[2, 2]),
                         node("Cast", "p", out="pf", to=onnx.TensorProto.FLOAT), node("Mul", "qs", "Ws", out="m"),
                         node("Mul", "pf", "m")),
         initializers={"Wq": Q_CONV_W, "Wz": np.int8(2), "Ws": np.float32(0.02), "W_real": (Q_CONV_W - 2.0) * 0.02},
         input_shape=(2, 2, 5, 5),
         reference=(node("Conv", "x", "W_real", pads=[1, 1, 1, 1], strides=[2, 2]),)),
    # depthwise, with a channel multiplier (EfficientNet's convolutions, quantised dynamically)
    Case("ConvInteger", (node("DynamicQuantizeLinear", "x", out=("q", "qs", "qz")),
                         node("ConvInteger", "q", "Wq", "qz", "Wz", out="p", pads=[1, 1, 1, 1], group=2),
                         node("Cast", "p", out="pf", to=onnx.TensorProto.FLOAT), node("Mul", "qs", "Ws", out="m"),
                         node("Mul", "pf", "m")),
         initializers={"Wq": Q_DEPTHWISE_W, "Wz": np.int8(-3), "Ws": np.float32(0.02),
                       "W_real": (Q_DEPTHWISE_W + 3.0) * 0.02}, label="depthwise",
         reference=(node("Conv", "x", "W_real", pads=[1, 1, 1, 1], group=2),)),
    q_case("QLinearConv", [quantised("QLinearConv", ["xq", "x_s", "x_z", "Wq", "Ws", "Wz", "y_s", "y_z", "B"],
                                     domain="", pads=[1, 1, 1, 1], kernel_shape=[3, 3])],
           [node("Conv", "x", "W_real", "B_real", pads=[1, 1, 1, 1])],
           {**X16, **q_params("y", 1 / 8, 0), "Wq": Q_CONV_W, "Ws": Q_CONV_WS, "Wz": np.zeros(3, np.int8),
            "B": Q_CONV_B, "W_real": Q_CONV_W * Q_CONV_WS.reshape(3, 1, 1, 1), "B_real": Q_CONV_B * Q_CONV_WS / 16},
           grid(1 / 16, -2, 2), opsets=(13, 21)),
    q_case("QLinearMatMul", [quantised("QLinearMatMul", ["xq", "x_s", "x_z", "Wq", "Ws", "Wz", "y_s", "y_z"], domain="")],
           [node("MatMul", "x", "W_real")],
           {**X16_U, **q_params("y", 1 / 16, 128, np.uint8), "Wq": Q_MATMUL_W, "Ws": Q_MATMUL_WS,
            "Wz": np.full(4, 128, np.uint8), "W_real": (Q_MATMUL_W - 128.0) * Q_MATMUL_WS},
           grid(1 / 16, -2, 2), opsets=(13, 21)),
    # both operands quantised activations (attention), the second the first transposed
    q_case("QLinearMatMul", [node("Transpose", "xq", out="xt", perm=[0, 1, 3, 2]),
                             quantised("QLinearMatMul", ["xq", "x_s", "x_z", "xt", "x_s", "x_z", "y_s", "y_z"],
                                       domain="")],
           [node("Transpose", "x", out="xt", perm=[0, 1, 3, 2]), node("MatMul", "x", "xt")],
           {**X16, **q_params("y", 1 / 8, 0)}, grid(1 / 16, -2, 2), label="both"),
    q_case("QGemm", [node("Flatten", "xq", out="fl"),
                     quantised("QGemm", ["fl", "x_s", "x_z", "Wq", "Ws", "Wz", "C", "y_s", "y_z"], transB=1, alpha=0.5)],
           [node("Flatten", "x", out="fl"), node("Gemm", "fl", "W_real", "C_real", transB=1, alpha=0.5)],
           {**X16, **q_params("y", 1 / 8, 0), "Wq": Q_GEMM_W, "Ws": Q_GEMM_WS, "Wz": np.zeros(4, np.int8),
            "C": Q_GEMM_C, **Q_GEMM_REAL}, grid(1 / 16, -2, 2)),
    # without y_scale QGemm's output is float
    Case("QGemm", (node("QuantizeLinear", "x", "x_s", "x_z", out="xq"), node("Flatten", "xq", out="fl"),
                   quantised("QGemm", ["fl", "x_s", "x_z", "Wq", "Ws", "Wz", "C"], out="h", transB=1)),
         initializers={**X16, "Wq": Q_GEMM_W, "Ws": Q_GEMM_WS, "Wz": np.zeros(4, np.int8), "C": Q_GEMM_C,
                       **Q_GEMM_REAL},
         draw=grid(1 / 16, -2, 2), label="float",
         reference=(node("Flatten", "x", out="fl"), node("Gemm", "fl", "W_real", "C_real", transB=1))),
    q_case("QLinearAdd", [node("GlobalAveragePool", "x", out="g"), node("QuantizeLinear", "g", "g_s", "g_z", out="gq"),
                          quantised("QLinearAdd", ["xq", "x_s", "x_z", "gq", "g_s", "g_z", "y_s", "y_z"])],
           [node("GlobalAveragePool", "x", out="g"), node("Add", "x", "g")],
           {**X16, **q_params("g", 1 / 32, 0), **q_params("y", 1 / 16, 0)}, grid(1 / 16, -2, 2)),
    q_case("QLinearMul", [quantised("QLinearMul", ["xq", "x_s", "x_z", "xq", "x_s", "x_z", "y_s", "y_z"])],
           [node("Mul", "x", "x")], {**X16, **q_params("y", 1 / 32, -100)}, grid(1 / 16, -2, 2)),
    q_case("QLinearSigmoid", [quantised("QLinearSigmoid", ["xq", "x_s", "x_z", "y_s", "y_z"])],
           [node("Sigmoid", "x")], {**X16_U, **q_params("y", 1 / 256, 0, np.uint8)}, grid(1 / 16, -2, 2)),
    q_case("QLinearLeakyRelu", [quantised("QLinearLeakyRelu", ["xq", "x_s", "x_z", "y_s", "y_z"], alpha=0.1)],
           [node("LeakyRelu", "x", alpha=0.1)], {**X16_U, **q_params("y", 1 / 32, 64, np.uint8)},
           grid(1 / 16, -2, 2, (0,))),
    # a uint8 output with zero point 0 clips what is negative: only the positive side has a gradient
    q_case("QLinearLeakyRelu", [quantised("QLinearLeakyRelu", ["xq", "x_s", "x_z", "y_s", "y_z"], alpha=0.1)],
           [node("Relu", "x")], {**X16_U, **q_params("y", 1 / 32, 0, np.uint8)}, grid(1 / 16, -2, 2, (0,)),
           label="clipped"),
    q_case("QLinearGlobalAveragePool", [quantised("QLinearGlobalAveragePool", ["xq", "x_s", "x_z", "y_s", "y_z"],
                                                  channels_last=0)],
           [node("GlobalAveragePool", "x")], {**X16, **q_params("y", 1 / 32, 0)}, grid(1 / 16, -2, 2)),
    q_case("QLinearAveragePool", [quantised("QLinearAveragePool", ["xq", "x_s", "x_z", "y_s", "y_z"],
                                            kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
           [node("AveragePool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
           {**X16, **q_params("y", 1 / 32, 0)}, grid(1 / 16, -2, 2), input_shape=(2, 2, 5, 5)),
    q_case("QLinearSoftmax", [quantised("QLinearSoftmax", ["xq", "x_s", "x_z", "y_s", "y_z"], axis=-1, opset=13)],
           [node("Softmax", "x", axis=-1)], {**X16_U, **q_params("y", 1 / 256, 0, np.uint8)}, grid(1 / 16, -2, 2)),
    q_case("QLinearConcat", [node("Neg", "x", out="n"), node("QuantizeLinear", "n", "n_s", "n_z", out="nq"),
                             quantised("QLinearConcat", ["y_s", "y_z", "xq", "x_s", "x_z", "nq", "n_s", "n_z"], axis=1)],
           [node("Neg", "x", out="n"), node("Concat", "x", "n", axis=1)],
           {**X16, **q_params("n", 1 / 32, 0), **q_params("y", 1 / 16, 0)}, grid(1 / 16, -2, 2)),
    # ---- resize
    Case("Resize", (node("Resize", "x", "", "scales", mode="linear"),), (2, 2, 3, 4),
         initializers={"scales": np.array([1, 1, 2, 1.5], np.float32)}),
    Case("Upsample", (node("Upsample", "x", "scales", mode="nearest"),), (2, 2, 3, 2),
         initializers={"scales": np.array([1, 1, 2, 3], np.float32)}, opsets=(9,)),
]


def feature_shape(case, opset, x):
    """The shape of "h", from an onnxruntime run of the case's nodes."""
    body = make_model(list(case.nodes), x.shape, None, case.initializers, opset=opset, output_name="h")
    session = ort.InferenceSession(body.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].shape


def check_case(case, opset):
    rng = np.random.default_rng(zlib.crc32(case.name(opset).encode()))
    x = case.draw(rng, case.input_shape)
    model = model_with_head(case.nodes, case.input_shape, feature_shape(case, opset, x), rng, case.initializers,
                            opset=opset)
    reference = None
    if case.reference:   # the same head after the float equivalent
        reference = onnx.ModelProto()
        reference.CopyFrom(model)
        del reference.graph.node[:]
        reference.graph.node.extend(list(case.reference) + list(model.graph.node)[len(case.nodes):])
    check_input_gradient(model, x, list(TARGET)[:case.input_shape[0]], reference=reference)
