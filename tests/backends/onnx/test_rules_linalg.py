"""Gradient rules of the linear maps with weights (rules/linalg.py): Conv, ConvTranspose, Gemm,
MatMul, Einsum, against float64 finite differences (onnx's reference evaluator, or numpy where it
falls short)."""
import numpy as np
import pytest
from onnx import helper

from multisal.errors import MultisalError
from onnx_fd import check_against_numpy, check_input_gradient, classifier_head, draw_distinct, make_model, run_gradient

RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _head(feature_shape, n_classes=3):
    return classifier_head(feature_shape, RNG, n_classes)


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


def test_weights_computed_from_the_input_are_refused_naming_the_node():
    """Conv is linear in x for fixed weights; weights that depend on x would need their own gradient."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"]), helper.make_node("Mul", ["w0", "m"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["h"], name="conv_with_computed_weights", pads=[1, 1, 1, 1])]
    head, inits = _head((2, 3, 4, 4))
    model = make_model(nodes + head, (2, 2, 4, 4), (2, 3), {**inits, "w0": RNG.standard_normal((3, 2, 3, 3))})
    with pytest.raises(MultisalError, match="conv_with_computed_weights.*input 1"):
        run_gradient(model, _x(2, 2, 4, 4), [0, 2])


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

    check_against_numpy(model, draw_distinct(RNG, (2, cin, side, side)), [0, 2], forward)


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

    check_against_numpy(model, draw_distinct(RNG, x_shape), [1], forward)


# ---- Einsum -------------------------------------------------------------------------------------

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
