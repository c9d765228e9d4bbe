"""Gradient rules of arithmetic (rules/arithmetic.py), against float64 finite differences, at
opsets 11, 13 and 21 (an op newer than 11 at its first opset and 21), beyond each rule's case in
the table (tests/onnx_rule_cases.py).

Inputs are drawn away from every kink (finite differences mean nothing there) and inside each op's
domain.
"""
import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_fd import check_input_gradient, draw_uniform, model_with_head, opsets_from

RNG = np.random.default_rng(0)
SHAPE = (2, 2, 3, 3)
TARGET = [1, 2]
MARGIN = 0.02


def _draw(low, high, kinks=(), ok=None):
    return draw_uniform(RNG, low, high, SHAPE, kinks, ok, MARGIN)


def _model(body, opset, inits=None):
    return model_with_head(body, SHAPE, SHAPE, RNG, inits, opset=opset)


def _gap(x):
    return x.mean(axis=(2, 3), keepdims=True)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_relu_add_mul_sub_div(opset):
    body = [helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Add", ["a", "x"], ["b"]),
            helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Sub", ["c", "x"], ["d"]),
            helper.make_node("Div", ["d", "k"], ["h"])]
    model = model_with_head(body, (1, 2, 3, 3), (1, 2, 3, 3), RNG, {"s": RNG.standard_normal((2, 1, 1)), "k": [1.5]},
                            opset=opset)
    check_input_gradient(model, RNG.standard_normal((1, 2, 3, 3)).astype(np.float32), [1])


@pytest.mark.parametrize("exponent, opset", [(e, o) for e in ("activation", "broadcast", "two", "int")
                                              for o in opsets_from(12 if e == "int" else 11)])
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


@pytest.mark.parametrize("opset", opsets_from(11))
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_variadic_broadcast(op, opset):
    body = [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("GlobalAveragePool", ["x"], ["g"]),
            helper.make_node(op, ["x", "n", "g", "c"], ["h"])]
    check_input_gradient(_model(body, opset, {"c": C_MAXMIN}), _draw(-2, 2, ok=_clear_winner(op)), TARGET)


@pytest.mark.parametrize("opset", opsets_from(11))
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_ties_split(op, opset):
    """op(x, x, c): x ties with itself everywhere; each copy gets half, so the total is dy, not 2 dy."""
    body = [helper.make_node(op, ["x", "x", "c"], ["h"])]
    check_input_gradient(_model(body, opset, {"c": C_MAXMIN}), _draw(-2, 2, [0.3, -0.2]), TARGET)


@pytest.mark.parametrize("opset", opsets_from(11))
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


@pytest.mark.parametrize("opset", opsets_from(11))
@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_sum_mean_variadic_broadcast(op, opset):
    body = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Mul", ["x", "s"], ["m"]),
            helper.make_node(op, ["x", "g", "m", "c"], ["h"])]
    inits = {"s": np.array([1.5, -0.5]).reshape(2, 1, 1), "c": np.array([0.1, 0.2, 0.3])}
    check_input_gradient(_model(body, opset, inits), _draw(-2, 2), TARGET)
