"""The NumPy test backend (tests/numpy_backend.py) against float64 central finite differences: its
hand-written gradients are the reference the analytic method tests and the conformance suite
lean on, so they are checked here, for every objective and target kind, at the input and at every
layer."""
import numpy as np
import pytest

import multisal as ms
import numpy_backend as nb
from helpers import assert_agree, central_differences
from multisal.objectives import NumpyOps, Region, class_weights, objective_terms

STEP = 1e-6


def _inputs(n=2, shape=(3, 5, 5), seed=1):
    rng = np.random.default_rng(seed)
    # Per-image offsets, so that the images' top classes differ.
    return (rng.standard_normal((n, *shape)) + 1.5 * rng.standard_normal((n, shape[0], 1, 1))).astype(np.float32)


def _objective(scores, weights, objective, axis):
    # The one definition of the objectives (multisal.objectives), not the backend's hand-written
    # derivative of it.
    return objective_terms(NumpyOps, scores, weights, objective, axis).sum()


def _rest(net, start):
    """The network's function from the output of layer `start` (-1: the input) to its output."""
    def run(h):
        for _, layer in net.layers[start + 1:]:
            h = layer.forward(h)
        return h
    return run


def _check(net, x, objective, target, weights, axis):
    be = nb.NumpyBackend(net, float64=True)
    names = net.names()[:-1]
    res = be.run(x, objective, target, layers=names, input_grad=True)
    outputs = net.forward(x.astype(np.float64))
    for name, start in [("input", -1)] + [(n, i) for i, n in enumerate(names)]:
        point = x.astype(np.float64) if start < 0 else outputs[start]
        rest = _rest(net, start)
        expected = central_differences(lambda v: _objective(rest(v), weights, objective, axis), point, STEP)
        got = res.input_grad if start < 0 else res.gradients[name]
        assert_agree(got, expected, tol=1e-6)
        if start >= 0:
            np.testing.assert_array_equal(res.activations[name], point)
    return res


@pytest.mark.parametrize("objective", ms.OBJECTIVES)
@pytest.mark.parametrize("kind", ["indices", "argmax_per_sample"])
def test_classifier_gradients_match_finite_differences(objective, kind):
    net = nb.classifier()
    x = _inputs()
    scores = net(x)
    target = np.array([3, 1]) if kind == "indices" else ms.ARGMAX_PER_SAMPLE
    weights, indices = class_weights(NumpyOps, scores, target)
    res = _check(net, x, objective, target, weights, 1)
    np.testing.assert_array_equal(res.target, [3, 1] if kind == "indices" else scores.argmax(1))
    assert kind == "indices" or len(set(res.target)) > 1, "the images should not share a top class"


@pytest.mark.parametrize("objective", ms.OBJECTIVES)
def test_region_gradients_of_a_dense_output_match_finite_differences(objective):
    net = nb.dense()
    x = _inputs(shape=(3, 4, 5))
    target = ms.region(1, box=(1, 0, 3, 4))
    weights = np.broadcast_to(target.weights((2, 2, 4, 5)), (2, 2, 4, 5))
    res = _check(net, x, objective, target, weights, Region.class_axis((2, 2, 4, 5)))
    assert res.target is None


def test_linear_and_conv_gap_linear_gradients_match_finite_differences():
    for net, shape in ((nb.linear(), (3, 4, 4)), (nb.conv_gap_linear(), (3, 6, 6))):
        x = _inputs(shape=shape)
        weights, _ = class_weights(NumpyOps, net(x), np.array([2, 0]))
        _check(net, x, "log_softmax", np.array([2, 0]), weights, 1)


def test_a_layer_request_differentiates_only_above_the_layer():
    net = nb.classifier()
    be = nb.NumpyBackend(net)
    x = _inputs()
    full = be.run(x, "softmax", np.array([0, 1]), layers=["relu1"], input_grad=True)
    net.backward_steps.clear()
    only = be.run(x, "softmax", np.array([0, 1]), layers=["relu1"])
    assert net.backward_steps == ["fc", "pool", "relu2", "conv2"]
    assert only.input_grad is None
    np.testing.assert_array_equal(only.gradients["relu1"], full.gradients["relu1"])


def test_targets_a_model_cannot_take_are_one_line_errors():
    x = _inputs()
    with pytest.raises(ms.MultisalError, match=r"^region target needs a dense output .* the model gives \(2, 5\)$"):
        nb.NumpyBackend(nb.classifier()).run(x, "logit", ms.region(0, box=(0, 0, 1, 1)), input_grad=True)
    with pytest.raises(ms.MultisalError, match=r"^the model output has shape \(2, 2, 5, 5\); a class target needs"):
        nb.NumpyBackend(nb.dense()).run(x, "logit", np.array([0, 1]), input_grad=True)
    with pytest.raises(ms.MultisalError, match="^target 5 out of range: the model has 5 classes"):
        nb.NumpyBackend(nb.classifier()).run(x, "logit", np.array([0, 5]), input_grad=True)
    with pytest.raises(ms.MultisalError, match="^the numpy backend needs a NumpyNet, got dict"):
        nb.NumpyBackend({})
