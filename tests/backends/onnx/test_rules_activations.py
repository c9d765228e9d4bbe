"""Gradient rules of activations and softmax (rules/activations.py), and the objectives written
on them, against float64 finite differences, at opsets 11, 13 and 21 (an op newer than 11 at its
first opset and 21), beyond each rule's case in the table (tests/onnx_rule_cases.py).

Inputs are drawn away from every kink (finite differences mean nothing there). onnx's
ReferenceEvaluator normalises Softmax/LogSoftmax along the one axis at every opset, not over the
axes from `axis` on as opsets < 13 specify, so those are checked against a numpy float64
reference instead.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from helpers import assert_agree
from multisal.backends.onnx.grad.builder import GradientRequest, build_gradient_model, grad_name
from onnx_fd import (check_input_gradient, classifier_head, draw_uniform, finite_differences, make_model,
                     model_with_head, objective_differences, opsets_from, run_gradient, to_float64)

RNG = np.random.default_rng(0)
SHAPE = (2, 2, 3, 3)
TARGET = [1, 2]
MARGIN = 0.02


def _draw(low, high, kinks=()):
    return draw_uniform(RNG, low, high, SHAPE, kinks, margin=MARGIN)


def _model(body, opset, inits=None):
    return model_with_head(body, SHAPE, SHAPE, RNG, inits, opset=opset)


@pytest.mark.parametrize("opset", [10, 11, 13])
def test_clip_inputs_and_attributes(opset):
    clip = (helper.make_node("Clip", ["x", "lo", "hi"], ["h"]) if opset >= 11 else
            helper.make_node("Clip", ["x"], ["h"], min=-0.5, max=0.7))
    model = model_with_head([clip], (1, 2, 3, 3), (1, 2, 3, 3), RNG, {"lo": -0.5, "hi": 0.7}, opset=opset)
    x = RNG.standard_normal((1, 2, 3, 3)).astype(np.float32)
    for bound in (-0.5, 0.7):   # finite differences straddling a bound would see half a gradient
        near = np.abs(x - bound) < 0.01
        x[near] = bound + np.where(x[near] > bound, 0.01, -0.01)
    check_input_gradient(model, x, [2])


@pytest.mark.parametrize("opset", opsets_from(11))
@pytest.mark.parametrize("slope", ["constant", "activation"])
def test_prelu(slope, opset):
    """A broadcasting slope: a weight (C,1,1), or a function of x (GAP(x), N,C,1,1) that gets a gradient."""
    body, inits = [helper.make_node("PRelu", ["x", "s"], ["h"])], {}
    if slope == "constant":
        inits = {"s": np.array([0.25, -0.4]).reshape(2, 1, 1)}
    else:
        body = [helper.make_node("GlobalAveragePool", ["x"], ["s"])] + body
    check_input_gradient(_model(body, opset, inits), _draw(-2, 2, [0]), TARGET)


def _softmax_ref(x, axis, log):
    """Softmax/LogSoftmax as opsets < 13 define it: coerced to 2D at axis, normalised per row."""
    rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
    z = rows - rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    return (z - lse if log else np.exp(z - lse)).reshape(x.shape)


@pytest.mark.parametrize("opset", opsets_from(11))
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


@pytest.mark.parametrize("objective", ["logit", "softmax", "log_softmax", "chainer_prob_ce"])
def test_objectives(objective):
    model = model_with_head([helper.make_node("Identity", ["x"], ["h"])], (3, 2, 2, 2), (1, 2, 2, 2), RNG,
                            n_classes=4)
    check_input_gradient(model, RNG.standard_normal((3, 2, 2, 2)).astype(np.float32), [0, 3, 1], objective=objective)


def test_float64_models_get_float64_gradient_graphs():
    body = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Clip", ["r", "lo", "hi"], ["h"])]
    head, inits = classifier_head((1, 2, 3, 3), RNG)
    model = to_float64(make_model(body + head, (2, 2, 3, 3), (2, 3), {**inits, "lo": 0.1, "hi": 0.8}))
    grad_model = build_gradient_model(model, GradientRequest(objective="softmax"), (2, 3, 3), batch=2)
    onnx.checker.check_model(grad_model)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 2, 3, 3))
    sess = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"x": x, "multisal_target": np.array([0, 2])})))["multisal_grad:x"]
    assert got.dtype == np.float64
    assert_agree(got, finite_differences(model, x, np.array([0, 2]), "softmax"), tol=1e-6)
