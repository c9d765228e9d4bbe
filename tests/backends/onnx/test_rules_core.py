"""Gradient rules of the core ops, each alone, against float64 finite differences."""
import numpy as np
import pytest
from onnx import helper

from onnx_fd import check_input_gradient, make_model, run_gradient

RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _head(feature_shape, n_classes=3):
    """Flatten + Gemm to a classifier output, so any feature map can be the objective's input."""
    size = int(np.prod(feature_shape[1:]))
    nodes = [helper.make_node("Flatten", ["h"], ["f"]), helper.make_node("Gemm", ["f", "Wfc", "bfc"], ["y"], transB=1)]
    return nodes, {"Wfc": RNG.standard_normal((n_classes, size)) * 0.3, "bfc": RNG.standard_normal(n_classes)}


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_relu_add_mul_sub_div(opset):
    body = [helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Add", ["a", "x"], ["b"]),
            helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Sub", ["c", "x"], ["d"]),
            helper.make_node("Div", ["d", "k"], ["h"])]
    head, inits = _head((1, 2, 3, 3))
    model = make_model(body + head, (1, 2, 3, 3), (1, 3), {**inits, "s": RNG.standard_normal((2, 1, 1)),
                                                           "k": [1.5]}, opset=opset)
    check_input_gradient(model, _x(1, 2, 3, 3), [1])


@pytest.mark.parametrize("opset", [10, 11, 13])
def test_clip_inputs_and_attributes(opset):
    clip = (helper.make_node("Clip", ["x", "lo", "hi"], ["h"]) if opset >= 11 else
            helper.make_node("Clip", ["x"], ["h"], min=-0.5, max=0.7))
    head, inits = _head((1, 2, 3, 3))
    model = make_model([clip] + head, (1, 2, 3, 3), (1, 3), {**inits, "lo": -0.5, "hi": 0.7}, opset=opset)
    x = _x(1, 2, 3, 3)
    for bound in (-0.5, 0.7):   # finite differences straddling a bound would see half a gradient
        near = np.abs(x - bound) < 0.01
        x[near] = bound + np.where(x[near] > bound, 0.01, -0.01)
    check_input_gradient(model, x, [2])


@pytest.mark.parametrize("stride, pads, group, kernel", [
    (1, [1, 1, 1, 1], 1, 3), (2, [1, 1, 1, 1], 1, 3), (1, [0, 0, 0, 0], 1, 1), (1, [1, 1, 1, 1], 4, 3),
    (2, [0, 0, 1, 1], 4, 3), (2, [2, 2, 2, 2], 2, 5)])
def test_conv(stride, pads, group, kernel):
    cin, cout = 4, 4
    conv = helper.make_node("Conv", ["x", "Wc", "bc"], ["h"], strides=[stride, stride], pads=pads, group=group,
                            kernel_shape=[kernel, kernel])
    out = (7 + pads[0] + pads[2] - kernel) // stride + 1
    head, inits = _head((1, cout, out, out))
    model = make_model([conv] + head, (2, cin, 7, 7), (2, 3),
                       {**inits, "Wc": RNG.standard_normal((cout, cin // group, kernel, kernel)) * 0.3,
                        "bc": RNG.standard_normal(cout)})
    check_input_gradient(model, _x(2, cin, 7, 7), [0, 2])


@pytest.mark.parametrize("stride, pads, kernel, multiplier, size", [
    (2, [0, 0, 1, 1], 3, 1, 8), (2, [1, 1, 1, 1], 3, 1, 7), (2, [2, 2, 2, 2], 5, 2, 7), (3, [1, 2, 0, 1], 3, 1, 8),
    (2, [0, 0, 0, 0], 1, 1, 7)])
def test_strided_depthwise_conv(stride, pads, kernel, multiplier, size):
    """Opset 18+: the polyphase Conv + Col2Im form (odd sizes cropped, a kernel smaller than the
    stride leaving phases without taps, a channel multiplier)."""
    cin, cout = 3, 3 * multiplier
    conv = helper.make_node("Conv", ["x", "Wc", "bc"], ["h"], strides=[stride, stride], pads=pads, group=cin,
                            kernel_shape=[kernel, kernel])
    out = [(size + pads[d] + pads[d + 2] - kernel) // stride + 1 for d in range(2)]
    head, inits = _head((1, cout, *out))
    model = make_model([conv] + head, (2, cin, size, size), (2, 3),
                       {**inits, "Wc": RNG.standard_normal((cout, 1, kernel, kernel)) * 0.3,
                        "bc": RNG.standard_normal(cout)}, opset=18)
    assert "Col2Im" in {n.op_type for n in run_gradient(model, _x(2, cin, size, size), [0, 2])[1].graph.node}
    check_input_gradient(model, _x(2, cin, size, size), [0, 2])


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
    check_input_gradient(model, _x(2, 3, 4, 4), [1, 3], objective="log_softmax")


@pytest.mark.parametrize("objective", ["logit", "softmax", "log_softmax", "chainer_prob_ce"])
def test_objectives(objective):
    head, inits = _head((1, 2, 2, 2), n_classes=4)
    nodes = [helper.make_node("Identity", ["x"], ["h"])] + head
    model = make_model(nodes, (3, 2, 2, 2), (3, 4), inits)
    check_input_gradient(model, _x(3, 2, 2, 2), [0, 3, 1], objective=objective)


def test_float64_models_get_float64_gradient_graphs():
    import onnx
    import onnxruntime as ort
    from onnx_fd import finite_differences, to_float64

    from helpers import assert_agree
    from multisal.backends.onnx.grad.builder import GradientRequest, build_gradient_model

    body = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Clip", ["r", "lo", "hi"], ["h"])]
    head, inits = _head((1, 2, 3, 3))
    model = to_float64(make_model(body + head, (2, 2, 3, 3), (2, 3), {**inits, "lo": 0.1, "hi": 0.8}))
    grad_model = build_gradient_model(model, GradientRequest(objective="softmax"), (2, 3, 3), batch=2)
    onnx.checker.check_model(grad_model)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 2, 3, 3))
    sess = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"x": x, "multisal_target": np.array([0, 2])})))["multisal_grad:x"]
    assert got.dtype == np.float64
    assert_agree(got, finite_differences(model, x, np.array([0, 2]), "softmax"), tol=1e-6)


@pytest.mark.parametrize("equation, second, out_shape", [
    # MaxVit's attention, as both exporters write it (upper case, spaces), both operands activations
    ("B H I D, B H J D -> B H I J", "xw", (2, 2, 3, 3)),
    ("B H I J, B H J D -> B H I D", "s", (2, 2, 3, 4)),
    ("...id,...jd->...ij", "xw", (2, 2, 3, 3)),   # ellipsis
    ("bhid,hjd", "c", (2, 3, 3)),                 # implicit output: the letters used once, sorted
    ("bhid,d->bhi", "v", (2, 2, 3)),              # a vector operand
    ("bhid->bh", None, (2, 2)),                   # i and d only in x: summed, so broadcast back
])
def test_einsum(equation, second, out_shape):
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]),
             helper.make_node("Einsum", ["x", "xw"], ["s"], equation="bhid,bhjd->bhij"),
             helper.make_node("Einsum", ["x"] + ([second] if second else []), ["h"], equation=equation)]
    if second == "s":
        nodes[2] = helper.make_node("Einsum", ["s", "x"], ["h"], equation=equation)
    head, inits = _head((1, *out_shape[1:]))
    model = make_model(nodes + head, (2, 2, 3, 4), (2, 3),
                       {**inits, "w": RNG.standard_normal(4), "c": RNG.standard_normal((2, 3, 4)),
                        "v": RNG.standard_normal(4)}, opset=12)
    check_input_gradient(model, _x(2, 2, 3, 4), [0, 2])
