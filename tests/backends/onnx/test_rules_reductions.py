"""Gradient rules of the reductions (rules/reductions.py), against float64 finite differences."""
import numpy as np
import pytest
from onnx import helper

from multisal.backends.onnx.grad.builder import grad_name
from multisal.errors import MultisalError
from helpers import assert_agree
from onnx_fd import (check_input_gradient, draw_distinct, finite_differences, make_model, model_with_head, run_gradient,
                     to_float64)

RNG = np.random.default_rng(0)


def _reduce_node(op, opset, axes, keepdims, noop=None, inits=None):
    """A Reduce node in the form of its opset: axes as attribute or (from 13 / 18) as input."""
    attrs = {"keepdims": keepdims}
    inputs = ["x"]
    if opset >= (13 if op == "ReduceSum" else 18):
        if axes is not None:
            inits["axes"] = np.asarray(axes, np.int64)
            inputs.append("axes")
        if noop is not None:
            attrs["noop_with_empty_axes"] = noop
    elif axes is not None:
        attrs["axes"] = list(axes)
    return helper.make_node(op, inputs, ["h"], **attrs)


def _reduced_shape(x_shape, axes, keepdims, noop=0):
    if axes is None or len(axes) == 0:
        if noop:
            return x_shape
        axes = range(len(x_shape))
    axes = {a % len(x_shape) for a in axes}
    return tuple(1 if i in axes else n for i, n in enumerate(x_shape) if keepdims or i not in axes)


def _reduce_model(op, opset, x_shape, axes, keepdims, noop=None):
    """The Reduce node, then the head; when the batch axis was reduced away, an Add of zeros
    broadcasts the result back to the batch so each sample still has its logits."""
    inits = {}
    node = _reduce_node(op, opset, axes, keepdims, noop, inits)
    out_shape = _reduced_shape(x_shape, axes, keepdims, noop)
    nodes = [node]
    if len(out_shape) < 2 or out_shape[0] != x_shape[0]:
        zeros = (x_shape[0],) + (1,) * max(len(out_shape) - 1, 1)
        nodes = [helper.make_node(op, node.input, ["r"], **{a.name: helper.get_attribute_value(a)
                                                           for a in node.attribute}),
                 helper.make_node("Add", ["r", "zeros"], ["h"])]
        inits["zeros"] = np.zeros(zeros)
        out_shape = zeros[:1] + (out_shape[1:] if len(out_shape) >= 2 else (1,))
    return model_with_head(nodes, x_shape, out_shape, RNG, inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax"])
@pytest.mark.parametrize("axes, keepdims", [([2, 3], 1), ([-1], 0), ([1, -2], 0), (None, 1), (None, 0)])
def test_reductions(op, opset, axes, keepdims):
    """Axes as attribute or (ReduceSum from 13, the others from 18) input; None = all axes."""
    x_shape = (2, 3, 2, 3)
    model = _reduce_model(op, opset, x_shape, axes, keepdims)
    check_input_gradient(model, draw_distinct(RNG, x_shape), [0, 1])


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax"])
@pytest.mark.parametrize("axes, noop", [(None, 1), ([], 1), ([], 0), ([0, 2], 0)])
def test_reductions_empty_axes_and_batch(op, axes, noop):
    """Axes input absent or empty: all axes, or the identity with noop_with_empty_axes=1; and the
    batch axis among the reduced ones (ReduceMean's count then comes from the run-time sizes)."""
    x_shape = (2, 3, 2, 2)
    model = _reduce_model(op, 18, x_shape, axes, 1, noop)
    check_input_gradient(model, draw_distinct(RNG, x_shape), [0, 2])


def test_float64_mean_over_the_batch():
    """The count a mean over the batch divides by comes from the run-time sizes, in the model's
    float type."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0, 2], keepdims=1),
             helper.make_node("Add", ["x", "m"], ["h"])]
    model = to_float64(model_with_head(nodes, (2, 3, 2, 2), (2, 3, 2, 2), RNG, opset=13))
    x = RNG.standard_normal((2, 3, 2, 2))
    values, _ = run_gradient(model, x, [0, 2])
    assert_agree(values[grad_name("x")], finite_differences(model, x, [0, 2]), tol=1e-6)


def test_reduce_max_ties_share_the_gradient():
    x = np.array([[[1.0, 3.0, 3.0, 2.0]], [[5.0, 5.0, 5.0, 5.0]]], np.float32)    # (2, 1, 4)
    node = helper.make_node("ReduceMax", ["x"], ["h"], axes=[2], keepdims=0)
    model = make_model([node, helper.make_node("Mul", ["h", "k"], ["y"])], (2, 1, 4), (2, 1),
                       {"k": np.ones((1, 1))}, opset=13)
    values, _ = run_gradient(model, x, [0, 0])
    np.testing.assert_allclose(values[grad_name("x")], [[[0, 0.5, 0.5, 0]], [[0.25] * 4]])


def test_computed_axes_are_refused_naming_the_node():
    x_shape = (2, 3, 2, 2)
    # axes = batch size - 1: computed from the batch, so not a constant the probe can fix
    computed_axes = [helper.make_node("Shape", ["x"], ["shape"]),
                     helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
                     helper.make_node("Sub", ["batch", "one"], ["axes"]),
                     helper.make_node("ReduceSum", ["x", "axes"], ["sum"], name="sum_of_computed_axes"),
                     helper.make_node("Add", ["x", "sum"], ["h"])]
    model = model_with_head(computed_axes, x_shape, x_shape, RNG, {"zero": np.array([0]), "one": np.array([1])},
                            opset=13)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(MultisalError, match="sum_of_computed_axes.*constant axes"):
        run_gradient(model, draw_distinct(RNG, x_shape), [0, 1])


NORMS = ["ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"]


def _away_from_zero(shape):
    """Values at least 0.1 from 0, where ReduceL1's |x| has its kink."""
    x = RNG.uniform(0.1, 1.5, shape) * RNG.choice([-1, 1], shape)
    return x.astype(np.float32)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("op", NORMS)
@pytest.mark.parametrize("axes, keepdims", [([2, 3], 1), ([-1], 0), ([0, 2], 1), (None, 0)])
def test_norms(op, opset, axes, keepdims):
    """The norms' axes as attribute (before opset 18) or input (from 18); None = all axes."""
    x_shape = (2, 3, 2, 3)
    model = _reduce_model(op, opset, x_shape, axes, keepdims)
    check_input_gradient(model, _away_from_zero(x_shape), [0, 1])


@pytest.mark.parametrize("op", NORMS)
def test_norms_of_each_element_alone(op):
    """Empty axes with noop_with_empty_axes=1: each element is reduced alone (|x|, x^2, x)."""
    x_shape = (2, 3, 2, 2)
    model = _reduce_model(op, 18, x_shape, [], 1, noop=1)
    check_input_gradient(model, _away_from_zero(x_shape), [0, 2])


def test_l2_norm_of_a_zero_vector_has_zero_gradient():
    """F.normalize's ReduceL2 on an all-zero row: torch's gradient there is 0, not 0/0."""
    nodes = [helper.make_node("ReduceL2", ["x"], ["n"], axes=[2], keepdims=1),
             helper.make_node("Add", ["n", "x"], ["y3"]),
             helper.make_node("ReduceSum", ["y3", "axes"], ["y"], keepdims=0)]
    model = make_model(nodes, (2, 3, 4), (2, 3), {"axes": np.array([2], np.int64)}, opset=13)
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    x[1, 2] = 0.0
    values, _ = run_gradient(model, x, [0, 2])
    got = values[grad_name("x")]
    assert np.isfinite(got).all()
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x).requires_grad_(True)
    scores = (torch.linalg.vector_norm(xt, dim=2, keepdim=True) + xt).sum(2)
    (expected,) = torch.autograd.grad(scores[[0, 1], [0, 2]].sum(), xt)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-7)
