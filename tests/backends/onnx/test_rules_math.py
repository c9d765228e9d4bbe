"""Gradient rules of elementwise math, activations and softmax, each alone, against float64 finite
differences, at opsets 11, 13 and 21 (an op newer than 11 at its first opset and 21).

Inputs are drawn away from every kink (finite differences mean nothing there) and inside each op's
domain. onnx's ReferenceEvaluator normalises Softmax/LogSoftmax along the one axis at every opset,
not over the axes from `axis` on as opsets < 13 specify, so those are checked against a numpy
float64 reference instead.
"""
import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_agree
from multisal.backends.onnx.grad.builder import grad_name
from multisal.objectives import objective_from_scores
from onnx_fd import check_input_gradient, make_model, objective_differences, run_gradient

RNG = np.random.default_rng(0)
SHAPE = (2, 2, 3, 3)
TARGET = [1, 2]
MARGIN = 0.02


def _opsets(first=11):
    return sorted({max(first, 11), *[o for o in (13, 21) if o >= first]})


def _head(feature_shape, n_classes=3):
    """Flatten + Gemm to a classifier output, so any feature map can be the objective's input."""
    size = int(np.prod(feature_shape[1:]))
    nodes = [helper.make_node("Flatten", ["h"], ["f"]), helper.make_node("Gemm", ["f", "Wfc", "bfc"], ["y"], transB=1)]
    return nodes, {"Wfc": RNG.standard_normal((n_classes, size)) * 0.3, "bfc": RNG.standard_normal(n_classes)}


def _draw(low, high, kinks=(), ok=None, shape=SHAPE):
    """Uniform float32 values in [low, high], at least MARGIN from every kink, and accepted by ok."""
    while True:
        x = RNG.uniform(low, high, shape).astype(np.float32)
        if all(np.abs(x - k).min() > MARGIN for k in kinks) and (ok is None or ok(x)):
            return x


def _model(body, opset, inits=None):
    head, head_inits = _head(SHAPE)
    return make_model(body + head, SHAPE, (SHAPE[0], 3), {**head_inits, **(inits or {})}, opset=opset)


def _gap(x):
    return x.mean(axis=(2, 3), keepdims=True)


# (op, attributes, first opset, low, high, kinks)
UNARY = [
    ("LeakyRelu", {"alpha": 0.1}, 11, -2, 2, [0]),
    ("Elu", {"alpha": 0.7}, 11, -2, 2, [0]),
    ("Sigmoid", {}, 11, -3, 3, []),
    ("HardSigmoid", {}, 11, -4, 4, [-2.5, 2.5]),
    ("HardSigmoid", {"alpha": 0.5, "beta": 0.6}, 11, -3, 3, [-1.2, 0.8]),
    ("HardSwish", {}, 14, -5, 5, [-3, 3]),
    ("Tanh", {}, 11, -2, 2, []),
    ("Softplus", {}, 11, -3, 3, []),
    ("Erf", {}, 11, -2, 2, []),
    ("Gelu", {}, 20, -3, 3, []),
    ("Gelu", {"approximate": "tanh"}, 20, -3, 3, []),
    ("Exp", {}, 11, -2, 1.5, []),
    ("Log", {}, 11, 0.3, 3, []),
    ("Sqrt", {}, 11, 0.3, 3, []),
    ("Reciprocal", {}, 11, -2, 2, [-0.3, 0, 0.3]),
    ("Abs", {}, 11, -2, 2, [0]),
]


@pytest.mark.parametrize("op, attrs, opset, low, high, kinks", [
    pytest.param(op, attrs, opset, low, high, kinks, id=f"{op}{''.join(f'-{v}' for v in attrs.values())}-{opset}")
    for op, attrs, first, low, high, kinks in UNARY for opset in _opsets(first)])
def test_unary(op, attrs, opset, low, high, kinks):
    x = _draw(low, high, kinks, ok=(lambda v: np.abs(v).min() > 0.3) if op == "Reciprocal" else None)
    model = _model([helper.make_node(op, ["x"], ["h"], **attrs)], opset)
    check_input_gradient(model, x, TARGET)


@pytest.mark.parametrize("opset", _opsets())
@pytest.mark.parametrize("slope", ["constant", "activation"])
def test_prelu(slope, opset):
    """A broadcasting slope: a weight (C,1,1), or a function of x (GAP(x), N,C,1,1) that gets a gradient."""
    body, inits = [helper.make_node("PRelu", ["x", "s"], ["h"])], {}
    if slope == "constant":
        inits = {"s": np.array([0.25, -0.4]).reshape(2, 1, 1)}
    else:
        body = [helper.make_node("GlobalAveragePool", ["x"], ["s"])] + body
    check_input_gradient(_model(body, opset, inits), _draw(-2, 2, [0]), TARGET)


@pytest.mark.parametrize("exponent, opset", [(e, o) for e in ("activation", "broadcast", "two", "int")
                                              for o in _opsets(12 if e == "int" else 11)])
def test_pow(exponent, opset):
    """Pow(x, x) differentiates base and exponent; constants: a broadcast (C,1,1) exponent, the
    scalar 2 (folded) and an int64 exponent (opset 12+) on a signed base."""
    b, inits = {"activation": ("x", {}), "broadcast": ("e", {"e": np.array([2.5, -1.5]).reshape(2, 1, 1)}),
                "two": ("e", {"e": np.array(2.0)}), "int": ("e", {"e": np.array(3, np.int64)})}[exponent]
    x = _draw(-2, 2) if exponent in ("two", "int") else _draw(0.3, 2)
    check_input_gradient(_model([helper.make_node("Pow", ["x", b], ["h"])], opset, inits), x, TARGET)


C_MAXMIN = np.array([0.3, -0.2]).reshape(2, 1, 1)


def _clear_winner(op):
    """x such that the winner of op(x, -x, GAP(x), c) leads the runner-up by MARGIN everywhere."""
    def ok(x):
        stack = np.sort(np.stack(np.broadcast_arrays(x, -x, _gap(x), C_MAXMIN)), axis=0)
        gap = stack[-1] - stack[-2] if op == "Max" else stack[1] - stack[0]
        return gap.min() > MARGIN
    return ok


@pytest.mark.parametrize("opset", _opsets())
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_variadic_broadcast(op, opset):
    body = [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("GlobalAveragePool", ["x"], ["g"]),
            helper.make_node(op, ["x", "n", "g", "c"], ["h"])]
    check_input_gradient(_model(body, opset, {"c": C_MAXMIN}), _draw(-2, 2, ok=_clear_winner(op)), TARGET)


@pytest.mark.parametrize("opset", _opsets())
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_ties_split(op, opset):
    """op(x, x, c): x ties with itself everywhere; each copy gets half, so the total is dy, not 2 dy."""
    body = [helper.make_node(op, ["x", "x", "c"], ["h"])]
    check_input_gradient(_model(body, opset, {"c": C_MAXMIN}), _draw(-2, 2, [0.3, -0.2]), TARGET)


@pytest.mark.parametrize("opset", _opsets())
@pytest.mark.parametrize("x_side", ["X", "Y"])
def test_where(x_side, opset):
    """A broadcast (3,1) condition; x on one side, GAP(x) (broadcast) on the other."""
    sides = ["x", "g2"] if x_side == "X" else ["g2", "x"]
    body = [helper.make_node("Cast", ["ci"], ["cond"], to=onnx.TensorProto.BOOL),
            helper.make_node("GlobalAveragePool", ["x"], ["g"]),
            helper.make_node("Mul", ["g", "k"], ["g2"]),
            helper.make_node("Where", ["cond", *sides], ["h"])]
    inits = {"ci": np.array([[1], [0], [1]], np.int64), "k": np.array(1.7)}
    check_input_gradient(_model(body, opset, inits), _draw(-2, 2), TARGET)


@pytest.mark.parametrize("opset", _opsets())
@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_sum_mean_variadic_broadcast(op, opset):
    body = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Mul", ["x", "s"], ["m"]),
            helper.make_node(op, ["x", "g", "m", "c"], ["h"])]
    inits = {"s": np.array([1.5, -0.5]).reshape(2, 1, 1), "c": np.array([0.1, 0.2, 0.3])}
    check_input_gradient(_model(body, opset, inits), _draw(-2, 2), TARGET)


def _softmax_ref(x, axis, log):
    """Softmax/LogSoftmax as opsets < 13 define it: coerced to 2D at axis, normalised per row."""
    rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
    z = rows - rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    return (z - lse if log else np.exp(z - lse)).reshape(x.shape)


@pytest.mark.parametrize("opset", _opsets())
@pytest.mark.parametrize("axis", [None, 1, 2, -1])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(op, axis, opset):
    attrs = {} if axis is None else {"axis": axis}
    model = _model([helper.make_node(op, ["x"], ["h"], **attrs)], opset)
    x = _draw(-2, 2)
    if opset >= 13:
        check_input_gradient(model, x, TARGET)
        return
    inits = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    ax = (1 if axis is None else axis) % len(SHAPE)

    def forward(v):
        h = _softmax_ref(v, ax, op == "LogSoftmax")
        return h.reshape(len(v), -1) @ inits["Wfc"].T + inits["bfc"]

    values, _ = run_gradient(model, x, TARGET)
    assert_agree(values[grad_name("x")], objective_differences(forward, x, TARGET, "logit"))


def test_chain_with_softmax_objective():
    body = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Softmax", ["t"], ["s"], axis=1),
            helper.make_node("Sqrt", ["s"], ["q"]), helper.make_node("Sigmoid", ["q"], ["h"])]
    check_input_gradient(_model(body, 21), _draw(-2, 2), TARGET, objective="softmax")
