"""Gradient rules of pooling (rules/pooling.py), against float64 finite differences (onnx's
reference evaluator, or the same pool with explicit pads where it falls short), and MaxPool's
choice among tied elements against torch."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from helpers import assert_agree
from multisal.backends.onnx.grad.builder import grad_name
from onnx_fd import check_input_gradient, draw_distinct, finite_differences, model_with_head, run_gradient

RNG = np.random.default_rng(0)


def _distinct(*shape):
    return draw_distinct(RNG, shape)


def _tensor(value, name):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _set_head(model, w, b):
    """Fixed classifier weights (the head's initializers are the first two)."""
    model.graph.initializer[0].CopyFrom(_tensor(w, "Wfc"))
    model.graph.initializer[1].CopyFrom(_tensor(b, "bfc"))
    return model


def _single(node, x_shape, h_shape, opset, extra_nodes=()):
    return model_with_head([*extra_nodes, node], x_shape, h_shape, RNG, opset=opset)


def _out(n, k, s, p0, p1, ceil, d=1):
    span = n + p0 + p1 - (k - 1) * d - 1
    out = -(-span // s) + 1 if ceil else span // s + 1
    if ceil and (out - 1) * s >= n + p0:      # a last window starting in the end pad is dropped
        out -= 1
    return out


def _pool_attrs(k, s, pads, ceil, d=1, **more):
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=list(pads), **more)
    if ceil:
        attrs["ceil_mode"] = 1
    if d != 1:
        attrs["dilations"] = [d, d]
    return attrs


def _pool_out(x_shape, k, s, pads, ceil, d=1):
    return (x_shape[0], x_shape[1]) + tuple(_out(x_shape[2 + i], k[i], s[i], pads[i], pads[2 + i], ceil, d)
                                            for i in range(2))


# ---- MaxPool ------------------------------------------------------------------------------------

# (input side, kernel, strides, pads, ceil_mode, dilation)
MAXPOOL_CASES = {
    "vgg_2x2_s2": (6, (2, 2), (2, 2), (0, 0, 0, 0), 0, 1),
    "resnet_3x3_s2_p1": (7, (3, 3), (2, 2), (1, 1, 1, 1), 0, 1),
    "squeezenet_3x3_s2_ceil": (8, (3, 3), (2, 2), (0, 0, 0, 0), 1, 1),
    "googlenet_3x3_s1_p1": (5, (3, 3), (1, 1), (1, 1, 1, 1), 0, 1),   # ceil_mode: see the test below
    "ceil_pads_uncovered_rows": (8, (3, 3), (3, 3), (1, 0, 0, 1), 1, 1),
    "floor_uncovered_rows": (7, (2, 3), (3, 2), (0, 1, 0, 1), 0, 1),
    "ceil_dropped_window": (7, (2, 2), (2, 2), (1, 1, 1, 1), 1, 1),   # the 5th window would start in the pad
    "window_wider_than_input": (2, (3, 3), (1, 1), (1, 1, 1, 1), 0, 1),
    "dilated_wider_than_input": (3, (2, 2), (2, 1), (1, 1, 1, 1), 0, 3),
    "dilated": (7, (2, 2), (1, 1), (1, 1, 0, 0), 0, 2),
    "dilated_strided_ceil": (8, (3, 2), (2, 2), (1, 1, 1, 1), 1, 2),
}


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("case", ["vgg_2x2_s2", "resnet_3x3_s2_p1", "squeezenet_3x3_s2_ceil"])
def test_maxpool_opsets(case, opset):
    _check_maxpool(case, opset)


@pytest.mark.parametrize("case", ["googlenet_3x3_s1_p1", "ceil_pads_uncovered_rows", "floor_uncovered_rows",
                                  "ceil_dropped_window", "window_wider_than_input", "dilated_wider_than_input",
                                  "dilated", "dilated_strided_ceil"])
def test_maxpool_geometry(case):
    _check_maxpool(case, 13)


def test_maxpool_stride1_ceil_mode():
    """GoogLeNet's branch pool is MaxPool(3, stride 1, pad 1, ceil_mode=1). onnx's reference evaluator
    gets its output shape wrong (7x7 from 5x5: unit strides take its CommonPool path, whose ceil
    branch ignores the pads), so it is checked against the same pool with ceil_mode=0, which
    onnxruntime runs identically at stride 1 (and which test_maxpool_geometry checks)."""
    x_shape = (2, 2, 5, 5)
    x = _distinct(*x_shape)
    w, b = RNG.standard_normal((3, 50)), RNG.standard_normal(3)
    grads = []
    for ceil in (0, 1):
        node = helper.make_node("MaxPool", ["x"], ["h"], **_pool_attrs((3, 3), (1, 1), (1, 1, 1, 1), ceil))
        model = _set_head(_single(node, x_shape, x_shape, 13), w, b)
        grads.append(run_gradient(model, x, [1, 2])[0][grad_name("x")])
    np.testing.assert_array_equal(grads[0], grads[1])
    assert np.abs(grads[0]).sum() > 0


def _hide_shape(case, model):
    """onnx's shape inference keeps a ceil_mode window that starts in the end pad, which
    onnxruntime's kernel (like torch and onnx's reference) drops; onnxruntime then refuses the
    Flatten + Gemm head. Leaving the input's spatial size symbolic keeps it out of the way."""
    if "dropped" in case:
        for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], "HW"):
            dim.dim_param = name
    return model


def _check_maxpool(case, opset):
    n, k, s, pads, ceil, d = MAXPOOL_CASES[case]
    x_shape = (1, 2, n, n)
    node = helper.make_node("MaxPool", ["x"], ["h"], **_pool_attrs(k, s, pads, ceil, d))
    model = _hide_shape(case, _single(node, x_shape, _pool_out(x_shape, k, s, pads, ceil, d), opset))
    check_input_gradient(model, _distinct(*x_shape), [1])


@pytest.mark.parametrize("auto_pad, n, begin", [("SAME_UPPER", 7, 1), ("SAME_UPPER", 6, 0), ("SAME_LOWER", 6, 1),
                                            ("VALID", 7, 0)])
def test_maxpool_auto_pad(auto_pad, n, begin):
    """onnx's reference evaluator puts SAME_LOWER's odd pad at the end for strided MaxPool (its
    _max_pool path splits the pad as SAME_UPPER does); onnxruntime puts it at the beginning. The
    oracle is therefore the same pool with onnxruntime's explicit pads, checked to run identically."""
    x_shape = (2, 1, n, n)
    out = -(-n // 2) if auto_pad != "VALID" else (n - 3) // 2 + 1
    total = max((out - 1) * 2 + 3 - n, 0)
    node = helper.make_node("MaxPool", ["x"], ["h"], kernel_shape=[3, 3], strides=[2, 2], auto_pad=auto_pad)
    model = _single(node, x_shape, (2, 1, out, out), 13)
    explicit = onnx.ModelProto()
    explicit.CopyFrom(model)
    explicit.graph.node[0].CopyFrom(helper.make_node("MaxPool", ["x"], ["h"], kernel_shape=[3, 3], strides=[2, 2],
                                                     pads=[begin, begin, total - begin, total - begin]))
    x = _distinct(*x_shape)
    assert_agree(_ort_run(model, x), _ort_run(explicit, x), tol=1e-6)
    values, _ = run_gradient(model, x, [0, 2])
    assert_agree(values[grad_name("x")], finite_differences(explicit, x, [0, 2]))


def _ort_run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("storage_order", [0, 1])
def test_maxpool_with_indices_output(storage_order):
    """A MaxPool with an Indices output: reused by the rule in row-major order, recomputed in
    column-major order; only Y carries a gradient."""
    x_shape = (1, 2, 6, 6)
    node = helper.make_node("MaxPool", ["x"], ["h", "idx"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                            storage_order=storage_order)
    model = _single(node, x_shape, (1, 2, 3, 3), 12)
    check_input_gradient(model, _distinct(*x_shape), [2])


def _torch_pool_gradient(x, w, b, target, pool):
    import torch
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    h = pool(torch.relu(xt))
    logits = h.reshape(len(x), -1) @ torch.tensor(w).T + torch.tensor(b)
    logits[torch.arange(len(x)), torch.tensor(target)].sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize("k, s, p, ceil", [(3, 2, 0, 1), (3, 2, 1, 0), (2, 2, 0, 0), (3, 1, 1, 0)])
def test_maxpool_ties_follow_torch(k, s, p, ceil):
    """After a ReLU most windows hold several zeros: the gradient goes to the first one, as in torch."""
    import torch
    x_shape = (2, 3, 8, 8)
    x = RNG.standard_normal(x_shape).astype(np.float32) - 1.0
    assert (x <= 0).mean() > 0.7
    pool = helper.make_node("MaxPool", ["r"], ["h"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, ceil_mode=ceil)
    out = _out(8, k, s, p, p, ceil)
    model = _single(pool, x_shape, (2, 3, out, out), 13, extra_nodes=[helper.make_node("Relu", ["x"], ["r"])])
    w, b = RNG.standard_normal((3, 3 * out * out)), RNG.standard_normal(3)
    _set_head(model, w, b)
    target = [2, 0]
    values, _ = run_gradient(model, x, target)
    expected = _torch_pool_gradient(x, w, b, target,
                                    lambda t: torch.nn.functional.max_pool2d(t, k, s, p, ceil_mode=bool(ceil)))
    assert_agree(values[grad_name("x")], expected, tol=1e-5)


# ---- AveragePool and GlobalMaxPool --------------------------------------------------------------

# (input side, kernel, strides, pads, ceil_mode, count_include_pad, dilation)
AVGPOOL_CASES = {
    "2x2_s2": (6, (2, 2), (2, 2), (0, 0, 0, 0), 0, 0, 1),
    "3x3_s2_p1_excl": (7, (3, 3), (2, 2), (1, 1, 1, 1), 0, 0, 1),
    "3x3_s2_p1_incl": (7, (3, 3), (2, 2), (1, 1, 1, 1), 0, 1, 1),
    "3x3_s2_p1_ceil_incl": (8, (3, 3), (2, 2), (1, 1, 1, 1), 1, 1, 1),
    "3x3_s2_ceil_excl": (8, (3, 3), (2, 2), (0, 1, 0, 0), 1, 0, 1),
    "3x3_s1_p1_incl": (5, (3, 3), (1, 1), (1, 1, 1, 1), 0, 1, 1),
    "3x3_s1_p1_excl": (5, (3, 3), (1, 1), (1, 0, 1, 0), 0, 0, 1),
    "ceil_dropped_window_incl": (7, (2, 2), (2, 2), (1, 1, 1, 1), 1, 1, 1),
    "3x2_s3x1_uncovered": (7, (3, 2), (3, 1), (0, 1, 0, 0), 0, 1, 1),
}


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("case", ["3x3_s2_p1_excl", "3x3_s2_p1_ceil_incl"])
def test_average_pool_opsets(case, opset):
    _check_average_pool(case, opset)


@pytest.mark.parametrize("case", ["2x2_s2", "3x3_s2_p1_incl", "3x3_s2_ceil_excl", "3x3_s1_p1_incl",
                                  "3x3_s1_p1_excl", "ceil_dropped_window_incl",
                                  "3x2_s3x1_uncovered"])
def test_average_pool_geometry(case):
    _check_average_pool(case, 13)


@pytest.mark.parametrize("cip, ceil", [(0, 0), (1, 1)])
def test_average_pool_dilations(cip, ceil):
    """dilations came to AveragePool at opset 19."""
    x_shape = (1, 2, 8, 8)
    node = helper.make_node("AveragePool", ["x"], ["h"], count_include_pad=cip,
                            **_pool_attrs((3, 2), (2, 2), (1, 1, 1, 0), ceil, 2))
    model = _single(node, x_shape, _pool_out(x_shape, (3, 2), (2, 2), (1, 1, 1, 0), ceil, 2), 19)
    check_input_gradient(model, _distinct(*x_shape), [1])


def _check_average_pool(case, opset):
    n, k, s, pads, ceil, cip, d = AVGPOOL_CASES[case]
    x_shape = (1, 2, n, n)
    node = helper.make_node("AveragePool", ["x"], ["h"], count_include_pad=cip, **_pool_attrs(k, s, pads, ceil, d))
    model = _hide_shape(case, _single(node, x_shape, _pool_out(x_shape, k, s, pads, ceil, d), opset))
    check_input_gradient(model, _distinct(*x_shape), [2])


@pytest.mark.parametrize("auto_pad, n, cip", [("SAME_UPPER", 7, 1), ("SAME_LOWER", 6, 0), ("SAME_UPPER", 6, 0)])
def test_average_pool_auto_pad(auto_pad, n, cip):
    x_shape = (1, 2, n, n)
    node = helper.make_node("AveragePool", ["x"], ["h"], kernel_shape=[3, 3], strides=[2, 2], auto_pad=auto_pad,
                            count_include_pad=cip)
    model = _single(node, x_shape, (1, 2, -(-n // 2), -(-n // 2)), 11)
    check_input_gradient(model, _distinct(*x_shape), [0])


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_global_max_pool(opset):
    x_shape = (2, 3, 3, 4)
    model = _single(helper.make_node("GlobalMaxPool", ["x"], ["h"]), x_shape, (2, 3, 1, 1), opset)
    check_input_gradient(model, _distinct(*x_shape), [0, 2])


@pytest.mark.parametrize("opset", [11, 13])
def test_global_max_pool_ties_follow_torch(opset):
    import torch
    x_shape = (2, 3, 4, 4)
    x = RNG.standard_normal(x_shape).astype(np.float32) - 1.0
    x[0, 0] = -1.0            # one channel all zeros after the ReLU
    model = _single(helper.make_node("GlobalMaxPool", ["r"], ["h"]), x_shape, (2, 3, 1, 1), opset,
                    extra_nodes=[helper.make_node("Relu", ["x"], ["r"])])
    w, b = RNG.standard_normal((3, 3)), RNG.standard_normal(3)
    _set_head(model, w, b)
    values, _ = run_gradient(model, x, [1, 2])
    expected = _torch_pool_gradient(x, w, b, [1, 2], lambda t: torch.nn.functional.adaptive_max_pool2d(t, 1))
    assert_agree(values[grad_name("x")], expected, tol=1e-5)
