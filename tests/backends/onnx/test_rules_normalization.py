"""Gradient rules of normalisation (rules/normalization.py), against float64 finite differences."""
import numpy as np
import pytest
from onnx import helper

from multisal.errors import MultisalError
from onnx_fd import check_input_gradient, draw_distinct, make_model, model_with_head, run_gradient

RNG = np.random.default_rng(0)


def test_batchnorm_globalpool_matmul_transpose_reshape():
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "beta", "m", "v"], ["bn"], epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0]),
             helper.make_node("Transpose", ["ft"], ["f2"], perm=[1, 0]),
             helper.make_node("MatMul", ["f2", "W"], ["y"])]
    graph_inits = {"g": RNG.uniform(0.5, 2, 3), "beta": RNG.standard_normal(3), "m": RNG.standard_normal(3),
                   "v": RNG.uniform(0.5, 2, 3), "W": RNG.standard_normal((3, 4)), "shape": np.array([2, 3], np.int64)}
    model = make_model(nodes, (2, 3, 4, 4), (2, 4), graph_inits)
    check_input_gradient(model, RNG.standard_normal((2, 3, 4, 4)).astype(np.float32), [1, 3], objective="log_softmax")


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_instance_norm(opset):
    x_shape = (2, 3, 3, 4)
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["h"], epsilon=1e-3)
    model = model_with_head([node], x_shape, x_shape, RNG, {"s": RNG.uniform(0.5, 2, 3), "b": RNG.standard_normal(3)},
                            opset=opset)
    check_input_gradient(model, draw_distinct(RNG, x_shape, spacing=0.1), [0, 1])


@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize("axis", [-1, 1, 2, 0])
def test_layer_norm(opset, axis):
    x_shape = (2, 3, 2, 3)
    norm_shape = x_shape[axis % 4:]
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["h"], axis=axis, epsilon=1e-3)
    model = model_with_head([node], x_shape, x_shape, RNG, {"s": RNG.uniform(0.5, 2, norm_shape),
                                                           "b": RNG.standard_normal(norm_shape)}, opset=opset)
    check_input_gradient(model, draw_distinct(RNG, x_shape, spacing=0.1), [2, 0])


@pytest.mark.parametrize("axis", [2, 0])
def test_layer_norm_statistics_outputs(axis):
    """The optional Mean and InvStdDev outputs used downstream also carry a gradient."""
    x_shape = (2, 3, 2, 3)
    norm_shape = x_shape[axis:]
    stat_shape = x_shape[:axis] + (1,) * (4 - axis)
    nodes = [helper.make_node("LayerNormalization", ["x", "s"], ["n", "mean", "inv"], axis=axis),
             helper.make_node("Mul", ["mean", "a"], ["ma"]), helper.make_node("Mul", ["inv", "c"], ["ic"]),
             helper.make_node("Add", ["n", "ma"], ["t"]), helper.make_node("Add", ["t", "ic"], ["h"])]
    model = model_with_head(nodes, x_shape, x_shape, RNG, {"s": RNG.uniform(0.5, 2, norm_shape),
                                                          "a": RNG.standard_normal(stat_shape[1:]),
                                                          "c": RNG.standard_normal(stat_shape[1:])}, opset=17)
    check_input_gradient(model, draw_distinct(RNG, x_shape, spacing=0.1), [1, 2])


def test_an_active_scale_is_refused_naming_the_node():
    x_shape = (2, 3, 2, 2)
    scale_from_x = [helper.make_node("ReduceMean", ["x"], ["s"], axes=[0, 1, 2], keepdims=0),
                    helper.make_node("LayerNormalization", ["x", "s"], ["h"], name="ln_with_active_scale")]
    model = model_with_head(scale_from_x, x_shape, x_shape, RNG, opset=17)
    with pytest.raises(MultisalError, match="ln_with_active_scale.*input 1"):
        run_gradient(model, draw_distinct(RNG, x_shape), [0, 1])
