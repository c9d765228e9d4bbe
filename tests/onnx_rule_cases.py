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
    check_input_gradient(model, x, list(TARGET)[:case.input_shape[0]])
