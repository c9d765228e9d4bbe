"""Gradient rules of pooling, normalisation, reductions and ConvTranspose, each alone, against
float64 finite differences (onnx's reference evaluator, or numpy where it falls short), and
MaxPool's choice among tied elements against torch."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from helpers import assert_agree
from onnx_fd import check_input_gradient, finite_differences, make_model, run_gradient
from multisal.backends.onnx.grad.builder import grad_name
from multisal.errors import MultisalError

RNG = np.random.default_rng(0)


def _distinct(*shape, spacing=0.05):
    """Distinct values (a scaled permutation), so no max, ReLU or window sits on a tie or a kink."""
    n = int(np.prod(shape))
    return ((RNG.permutation(n) - n / 2) * spacing).reshape(shape).astype(np.float32)


def _head(feature_shape, n_classes=3):
    """Flatten + Gemm to a classifier output, so any feature map can be the objective's input."""
    size = int(np.prod(feature_shape[1:]))
    nodes = [helper.make_node("Flatten", ["h"], ["f"]), helper.make_node("Gemm", ["f", "Wfc", "bfc"], ["y"], transB=1)]
    return nodes, {"Wfc": RNG.standard_normal((n_classes, size)) * 0.3, "bfc": RNG.standard_normal(n_classes)}


def _tensor(value, name):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _set_head(model, w, b):
    """Fixed classifier weights (the head's initializers are the first two)."""
    model.graph.initializer[0].CopyFrom(_tensor(w, "Wfc"))
    model.graph.initializer[1].CopyFrom(_tensor(b, "bfc"))
    return model


def _single(node, x_shape, h_shape, opset, inits=None, extra_nodes=()):
    head, head_inits = _head(h_shape)
    return make_model([*extra_nodes, node] + head, x_shape, (x_shape[0], 3), {**head_inits, **(inits or {})},
                      opset=opset)


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


# ---- reductions ---------------------------------------------------------------------------------

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
    head, head_inits = _head(out_shape)
    return make_model(nodes + head, x_shape, (x_shape[0], 3), {**head_inits, **inits}, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax"])
@pytest.mark.parametrize("axes, keepdims", [([2, 3], 1), ([-1], 0), ([1, -2], 0), (None, 1), (None, 0)])
def test_reductions(op, opset, axes, keepdims):
    """Axes as attribute or (ReduceSum from 13, the others from 18) input; None = all axes."""
    x_shape = (2, 3, 2, 3)
    model = _reduce_model(op, opset, x_shape, axes, keepdims)
    check_input_gradient(model, _distinct(*x_shape), [0, 1])


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax"])
@pytest.mark.parametrize("axes, noop", [(None, 1), ([], 1), ([], 0), ([0, 2], 0)])
def test_reductions_empty_axes_and_batch(op, axes, noop):
    """Axes input absent or empty: all axes, or the identity with noop_with_empty_axes=1; and the
    batch axis among the reduced ones (ReduceMean's count then comes from the run-time sizes)."""
    x_shape = (2, 3, 2, 2)
    model = _reduce_model(op, 18, x_shape, axes, 1, noop)
    check_input_gradient(model, _distinct(*x_shape), [0, 2])


def test_reduce_max_ties_share_the_gradient():
    x = np.array([[[1.0, 3.0, 3.0, 2.0]], [[5.0, 5.0, 5.0, 5.0]]], np.float32)    # (2, 1, 4)
    node = helper.make_node("ReduceMax", ["x"], ["h"], axes=[2], keepdims=0)
    model = make_model([node, helper.make_node("Mul", ["h", "k"], ["y"])], (2, 1, 4), (2, 1),
                       {"k": np.ones((1, 1))}, opset=13)
    values, _ = run_gradient(model, x, [0, 0])
    np.testing.assert_allclose(values[grad_name("x")], [[[0, 0.5, 0.5, 0]], [[0.25] * 4]])


# ---- normalisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_instance_norm(opset):
    x_shape = (2, 3, 3, 4)
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["h"], epsilon=1e-3)
    model = _single(node, x_shape, x_shape, opset, {"s": RNG.uniform(0.5, 2, 3), "b": RNG.standard_normal(3)})
    check_input_gradient(model, _distinct(*x_shape, spacing=0.1), [0, 1])


@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize("axis", [-1, 1, 2, 0])
def test_layer_norm(opset, axis):
    x_shape = (2, 3, 2, 3)
    norm_shape = x_shape[axis % 4:]
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["h"], axis=axis, epsilon=1e-3)
    model = _single(node, x_shape, x_shape, opset, {"s": RNG.uniform(0.5, 2, norm_shape),
                                                   "b": RNG.standard_normal(norm_shape)})
    check_input_gradient(model, _distinct(*x_shape, spacing=0.1), [2, 0])


@pytest.mark.parametrize("axis", [2, 0])
def test_layer_norm_statistics_outputs(axis):
    """The optional Mean and InvStdDev outputs used downstream also carry a gradient."""
    x_shape = (2, 3, 2, 3)
    norm_shape = x_shape[axis:]
    stat_shape = x_shape[:axis] + (1,) * (4 - axis)
    nodes = [helper.make_node("LayerNormalization", ["x", "s"], ["n", "mean", "inv"], axis=axis),
             helper.make_node("Mul", ["mean", "a"], ["ma"]), helper.make_node("Mul", ["inv", "c"], ["ic"]),
             helper.make_node("Add", ["n", "ma"], ["t"]), helper.make_node("Add", ["t", "ic"], ["h"])]
    head, inits = _head(x_shape)
    model = make_model(nodes + head, x_shape, (2, 3), {**inits, "s": RNG.uniform(0.5, 2, norm_shape),
                                                       "a": RNG.standard_normal(stat_shape[1:]),
                                                       "c": RNG.standard_normal(stat_shape[1:])}, opset=17)
    check_input_gradient(model, _distinct(*x_shape, spacing=0.1), [1, 2])


# ---- ConvTranspose ------------------------------------------------------------------------------

def _conv_transpose_f64(x, w, strides, pads, dilations, group, out_shape):
    """ConvTranspose in float64 numpy: Y[o, s*i + d*u - pad_begin] += X[c, i] * W[c, o, u] per group."""
    n, cin, *sp = x.shape
    cout_g = w.shape[1]
    k = w.shape[2:]
    full = [strides[a] * (sp[a] - 1) + (k[a] - 1) * dilations[a] + 1 for a in range(2)]
    big = np.zeros((n, cout_g * group, max(full[0], out_shape[0] + pads[0]), max(full[1], out_shape[1] + pads[1])))
    cin_g = cin // group
    for c in range(cin):
        g = c // cin_g
        for u in range(k[0]):
            for v in range(k[1]):
                rows = slice(u * dilations[0], u * dilations[0] + strides[0] * (sp[0] - 1) + 1, strides[0])
                cols = slice(v * dilations[1], v * dilations[1] + strides[1] * (sp[1] - 1) + 1, strides[1])
                big[:, g * cout_g:(g + 1) * cout_g, rows, cols] += x[:, c, None] * w[c, :, u, v][None, :, None, None]
    return big[:, :, pads[0]:pads[0] + out_shape[0], pads[1]:pads[1] + out_shape[1]]


def _check_numpy_oracle(model, x, target, forward):
    """The input gradient against central differences of a float64 numpy forward (checked first
    to compute what onnxruntime computes)."""
    np.testing.assert_allclose(_ort_run(model, x), forward(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    values, _ = run_gradient(model, x, target)
    expected = np.zeros(x.shape)
    base = x.astype(np.float64)
    rows = np.arange(len(x))
    for idx in np.ndindex(x.shape):
        xp, xm = base.copy(), base.copy()
        xp[idx] += 1e-4
        xm[idx] -= 1e-4
        expected[idx] = (forward(xp)[rows, target] - forward(xm)[rows, target]).sum() / 2e-4
    assert_agree(values[grad_name("x")], expected)


# strides, pads, output_padding, dilations, group
CONV_T_CASES = {
    "s2_g2_p1_op1": ((2, 2), (1, 1, 1, 1), (1, 1), (1, 1), 2),
    "s2_g4_p0": ((2, 2), (0, 0, 0, 0), (0, 0), (1, 1), 4),
    "s1_g1_p1": ((1, 1), (1, 1, 1, 1), (0, 0), (1, 1), 1),
    "s3x2_d2_asym": ((3, 2), (1, 0, 2, 1), (2, 1), (2, 1), 2),
}


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("case", ["s2_g2_p1_op1", "s3x2_d2_asym"])
def test_conv_transpose_opsets(case, opset):
    _check_conv_transpose(case, opset)


@pytest.mark.parametrize("case", ["s2_g4_p0", "s1_g1_p1"])
def test_conv_transpose_geometry(case):
    _check_conv_transpose(case, 13)


def _check_conv_transpose(case, opset):
    """onnx's reference ConvTranspose is wrong for group > 1 unless each group has one output
    channel (it slices W by output channels and writes one channel per group): numpy oracle."""
    strides, pads, out_pad, dil, group = CONV_T_CASES[case]
    cin, cout, side = 4, 4, 4
    w = RNG.standard_normal((cin, cout // group, 3, 3)) * 0.3
    bias = RNG.standard_normal(cout)
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["h"], strides=list(strides), pads=list(pads),
                            output_padding=list(out_pad), dilations=list(dil), group=group, kernel_shape=[3, 3])
    out = [strides[a] * (side - 1) + out_pad[a] + 2 * dil[a] + 1 - pads[a] - pads[a + 2] for a in range(2)]
    head, inits = _head((2, cout, *out))
    model = make_model([node] + head, (2, cin, side, side), (2, 3), {**inits, "W": w, "B": bias}, opset=opset)

    def forward(v):
        h = _conv_transpose_f64(v, w, strides, pads[:2], dil, group, out) + bias[:, None, None]
        return h.reshape(len(v), -1) @ inits["Wfc"].T + inits["bfc"]

    _check_numpy_oracle(model, _distinct(2, cin, side, side), [0, 2], forward)


@pytest.mark.parametrize("attrs, out, begin", [
    (dict(output_shape=[8, 8]), 8, 1), (dict(output_shape=[7, 7]), 7, 1), (dict(output_shape=[10, 10]), 10, 0),
    (dict(auto_pad="SAME_UPPER"), 8, 0), (dict(auto_pad="SAME_LOWER"), 8, 1)])
def test_conv_transpose_output_shape(attrs, out, begin):
    """output_shape / auto_pad (onnx's reference evaluator also fails on output_shape without
    auto_pad); the numpy oracle's begin pad is onnxruntime's split of the total pad."""
    x_shape, group = (1, 4, 4, 4), 2
    w = RNG.standard_normal((4, 2, 3, 3)) * 0.3
    node = helper.make_node("ConvTranspose", ["x", "W"], ["h"], strides=[2, 2], group=group, **attrs)
    head, inits = _head((1, 4, out, out))
    model = make_model([node] + head, x_shape, (1, 3), {**inits, "W": w}, opset=13)

    def forward(v):
        h = _conv_transpose_f64(v, w, (2, 2), (begin, begin), (1, 1), group, (out, out))
        return h.reshape(1, -1) @ inits["Wfc"].T + inits["bfc"]

    _check_numpy_oracle(model, _distinct(*x_shape), [1], forward)


# ---- what is refused ----------------------------------------------------------------------------

def test_refusals_name_the_node():
    x_shape = (2, 3, 2, 2)
    # axes = batch size - 1: computed from the batch, so not a constant the probe can fix
    computed_axes = [helper.make_node("Shape", ["x"], ["shape"]),
                     helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
                     helper.make_node("Sub", ["batch", "one"], ["axes"]),
                     helper.make_node("ReduceSum", ["x", "axes"], ["sum"], name="sum_of_computed_axes"),
                     helper.make_node("Add", ["x", "sum"], ["h"])]
    head, inits = _head(x_shape)
    model = make_model(computed_axes + head, x_shape, (2, 3), {**inits, "zero": np.array([0]), "one": np.array([1])},
                       opset=13)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(MultisalError, match="sum_of_computed_axes.*constant axes"):
        run_gradient(model, _distinct(*x_shape), [0, 1])
    scale_from_x = [helper.make_node("ReduceMean", ["x"], ["s"], axes=[0, 1, 2], keepdims=0),
                    helper.make_node("LayerNormalization", ["x", "s"], ["h"], name="ln_with_active_scale")]
    model = make_model(scale_from_x + head, x_shape, (2, 3), inits, opset=17)
    with pytest.raises(MultisalError, match="ln_with_active_scale.*input 1"):
        run_gradient(model, _distinct(*x_shape), [0, 1])
