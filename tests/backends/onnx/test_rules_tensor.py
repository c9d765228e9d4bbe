"""Gradient rules of the select/pad/resize/repeat ops, each alone, against float64 finite differences
(onnx's reference evaluator), at the opsets where their form changes."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from helpers import assert_agree
from multisal.backends.onnx.grad.builder import GradientRequest, build_gradient_model
from multisal.backends.onnx.grad.builder import grad_name
from multisal.backends.onnx.grad.objective import TARGET_INPUT
from onnx_fd import check_input_gradient, make_model, run_gradient

RNG = np.random.default_rng(1)
OPSETS = [11, 13, 18, 21]


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _head(feature_shape, n_classes=3, source="h"):
    """Flatten + Gemm to a classifier output, sized for the feature map it follows."""
    size = int(np.prod(feature_shape[1:]))
    nodes = [helper.make_node("Flatten", [source], ["f"]), helper.make_node("Gemm", ["f", "Wfc", "bfc"], ["y"], transB=1)]
    return nodes, {"Wfc": RNG.standard_normal((n_classes, size)) * 0.3, "bfc": RNG.standard_normal(n_classes)}


def _check(body, in_shape, feature_shape, inits=None, opset=17, target=(0, 2), **kw):
    head, head_inits = _head(feature_shape)
    model = make_model(body + head, in_shape, (in_shape[0], 3), {**head_inits, **(inits or {})}, opset=opset)
    return check_input_gradient(model, _x(*in_shape), list(target)[:in_shape[0]], **kw)


def _check_numpy(body, inits, forward, in_shape, opset, target=(0, 2)):
    """Like _check, for ops onnx's reference evaluator cannot run: forward(x) is a float64 numpy
    version of the body (checked against onnxruntime first), the oracle its finite differences."""
    x = _x(*in_shape)
    feature_shape = forward(x.astype(np.float64)).shape
    head, head_inits = _head(feature_shape)
    model = make_model(body + head, in_shape, (in_shape[0], 3), {**head_inits, **inits}, opset=opset)
    w, b = head_inits["Wfc"], head_inits["bfc"]

    def scores(v):
        return forward(v).reshape(len(v), -1) @ w.T + b

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_agree(session.run(None, {"x": x})[0], scores(x.astype(np.float64)), tol=1e-5)
    target = np.asarray(target[:in_shape[0]])
    values, _ = run_gradient(model, x, target)
    expected = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        xp, xm = x.astype(np.float64), x.astype(np.float64)
        xp[idx] += 1e-4
        xm[idx] -= 1e-4
        expected[idx] = (scores(xp) - scores(xm))[np.arange(len(x)), target].sum() / 2e-4
    assert_agree(values[grad_name("x")], expected)


def _ints(*values):
    return np.array(values, np.int64)


# ---- Concat / Split ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
def test_concat_with_itself_and_a_constant(opset):
    body = [helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Concat", ["x", "c", "r", "x"], ["h"], axis=-1)]
    _check(body, (2, 2, 3, 2), (2, 2, 3, 7), {"c": RNG.standard_normal((2, 2, 3, 1))}, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_concat_on_the_batch_axis(opset):
    # (2, ..) + (2, ..) -> (4, ..), then regrouped into 2 rows: offsets from the run-time extents.
    body = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["r", "x"], ["c"], axis=0),
            helper.make_node("Reshape", ["c", "shape"], ["h"])]
    _check(body, (2, 3, 2), (2, 12), {"shape": _ints(2, -1)}, opset=opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_split_unequal_parts(opset):
    # 5 channels -> [3, 2] (num_outputs=2 from opset 18 splits 5 as 3 + 2), both parts used, reordered.
    if opset >= 18:
        split = helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2)
    elif opset >= 13:
        split = helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1)
    else:
        split = helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[3, 2])
    body = [split, helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Concat", ["b", "ra", "b"], ["h"], axis=1)]
    _check(body, (2, 5, 2, 2), (2, 7, 2, 2), {"sizes": _ints(3, 2)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_split_with_an_unused_output(opset):
    split = (helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=2) if opset >= 13 else
             helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2, split=[1, 2, 1]))
    body = [split, helper.make_node("Concat", ["c", "a"], ["h"], axis=2)]
    _check(body, (2, 2, 4, 3), (2, 2, 2, 3), {"sizes": _ints(1, 2, 1)}, opset=opset)


# ---- Slice ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
def test_slice_negative_indices_and_steps(opset):
    # axis 2 (7): from -1 back to (clamped) the start, step -2 -> rows 6, 4, 2, 0
    # axis -1 (6): from 1 to -1 by 2 -> columns 1, 3; axis 1: the full range with an end past it.
    body = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["h"])]
    inits = {"st": _ints(-1, 1, 0), "en": _ints(-100, -1, 2 ** 62), "ax": _ints(2, -1, 1), "sp": _ints(-2, 2, 1)}
    _check(body, (2, 2, 7, 6), (2, 2, 4, 2), inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 21])
def test_slice_strided_on_two_axes_last_axis_first(opset):
    # W: 1, 4 (then padded back to 6); H: 5, 3, 1 -- the H dilation reshapes a W axis not yet padded back.
    body = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["h"])]
    inits = {"st": _ints(1, 5), "en": _ints(5, 0), "ax": _ints(3, 2), "sp": _ints(3, -2)}
    _check(body, (2, 2, 7, 6), (2, 2, 3, 2), inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_slice_steps_one_and_three_default_axes(opset):
    body = [helper.make_node("Slice", ["x", "st", "en"], ["h"])]
    _check(body, (2, 3, 5), (2, 2, 4), {"st": _ints(0, 1, -5), "en": _ints(10, 3, 4)}, opset=opset)
    body = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["h"])]
    _check(body, (2, 3, 8), (2, 3, 2), {"st": _ints(1), "en": _ints(7), "ax": _ints(2), "sp": _ints(3)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 18])
def test_slice_with_ends_computed_at_run_time(opset):
    # end = width - 4 from Shape: the rule cannot read it at build time and goes through a one-hot.
    body = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "two"], ["w"]),
            helper.make_node("Sub", ["w", "four"], ["end"]),
            helper.make_node("Slice", ["x", "st", "end", "ax", "sp"], ["h"])]
    inits = {"two": _ints(2), "four": _ints(4), "st": _ints(-1), "ax": _ints(2), "sp": _ints(-1)}
    _check(body, (2, 2, 5), (2, 2, 3), inits, opset=opset)


# ---- Gather / GatherElements ------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index", [0, -1])
def test_gather_scalar_index_class_token(opset, index):
    body = [helper.make_node("Gather", ["x", "i"], ["h"], axis=1)]
    _check(body, (2, 5, 4), (2, 4), {"i": np.array(index, np.int64)}, opset=opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_gather_repeated_and_negative_indices(opset):
    body = [helper.make_node("Gather", ["x", "i"], ["h"], axis=2)]
    _check(body, (2, 2, 4, 3), (2, 2, 2, 3, 3), {"i": np.array([[1, -1, 1], [3, 0, 1]], np.int64)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 18])
def test_gather_indices_computed_at_run_time(opset):
    body = [helper.make_node("Cast", ["fi"], ["i"], to=7), helper.make_node("Gather", ["x", "i"], ["h"], axis=-1)]
    _check(body, (2, 2, 4), (2, 2, 5), {"fi": np.array([2, 2, -1, 0, 2])}, opset=opset)


def test_gather_contiguous_indices_on_the_last_axis():
    body = [helper.make_node("Gather", ["x", "i"], ["h"], axis=2)]
    _check(body, (2, 3, 5), (2, 3, 3), {"i": _ints(1, 2, 3)}, opset=13)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("repeats", [True, False])
def test_gather_elements(opset, repeats):
    idx = (np.array([[[0, 0], [2, -1]], [[1, 1], [1, 0]]]) if repeats else
           np.array([[[0, 1], [2, 0]], [[1, 2], [0, 1]]]))
    idx = np.broadcast_to(idx, (2, 2, 2, 2)).astype(np.int64).copy()
    body = [helper.make_node("GatherElements", ["x", "i"], ["h"], axis=2)]
    _check(body, (2, 2, 3, 2), (2, 2, 2, 2), {"i": idx}, opset=opset)


# ---- Pad ----------------------------------------------------------------------------------------------
def _pad_node(opset, mode, pads, axes=None):
    if opset < 11:
        return [helper.make_node("Pad", ["x"], ["h"], mode=mode, pads=pads)], {}
    inputs = ["x", "pads", "cv"] + (["axes"] if axes is not None else [])
    inits = {"pads": np.array(pads, np.int64), "cv": np.array(0.5, np.float32)}
    if axes is not None:
        inits["axes"] = np.array(axes, np.int64)
    return [helper.make_node("Pad", inputs, ["h"], mode=mode)], inits


@pytest.mark.parametrize("opset", [10] + OPSETS)
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_modes(opset, mode):
    body, inits = _pad_node(opset, mode, [0, 0, 1, 2, 0, 0, 2, 1])
    _check(body, (2, 2, 4, 3), (2, 2, 7, 6), inits, opset=opset)


@pytest.mark.parametrize("opset", [19, 21])
@pytest.mark.parametrize("mode", ["wrap", "reflect", "edge"])
def test_pad_axes_input_and_wrap(opset, mode):
    body, inits = _pad_node(opset, mode, [2, 1, 2, 3], axes=[-1, 2])
    _check(body, (2, 2, 4, 3), (2, 2, 8, 7), inits, opset=opset)


def test_pad_constant_with_negative_pads():
    # onnx's reference evaluator cannot run negative pads (numpy.pad refuses them): numpy oracle.
    body, inits = _pad_node(13, "constant", [0, 0, -1, 2, 0, 0, 1, -2])   # H: crop 1 / add 1; W: add 2 / crop 2

    def forward(x):
        return np.pad(x[:, :, 1:, :-2], ((0, 0), (0, 0), (0, 1), (2, 0)), constant_values=0.5)
    _check_numpy(body, inits, forward, (2, 2, 4, 5), opset=13)


# ---- Expand / Tile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
def test_expand(opset):
    body = [helper.make_node("Expand", ["x", "shape"], ["h"])]
    _check(body, (2, 3, 1, 1), (2, 3, 2, 4), {"shape": _ints(1, 3, 2, 4)}, opset=opset)


def test_expand_adds_a_leading_axis():
    # (2, 4) -> (3, 2, 4): the gradient sums over the new axis.
    body = [helper.make_node("Expand", ["x", "shape"], ["e"]), helper.make_node("Transpose", ["e"], ["h"], perm=[1, 0, 2])]
    _check(body, (2, 4), (2, 3, 4), {"shape": _ints(3, 1, 4)}, opset=13)


@pytest.mark.parametrize("opset", OPSETS)
def test_tile(opset):
    body = [helper.make_node("Tile", ["x", "r"], ["h"])]
    _check(body, (2, 2, 3, 2), (2, 4, 3, 6), {"r": _ints(1, 2, 1, 3)}, opset=opset)


# ---- Resize / Upsample ----------------------------------------------------------------------------------
def _resize(opset, mode, ctm, scales=None, sizes=None, **attrs):
    if ctm is not None:
        attrs["coordinate_transformation_mode"] = ctm
    inits = {"roi": np.zeros(0, np.float32)}
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
        inputs = ["x", "roi", "scales"]
    else:
        inits["sizes"] = np.array(sizes, np.int64)
        inits["scales"] = np.zeros(0, np.float32)
        inputs = ["x", "roi", "scales", "sizes"] if opset < 13 else ["x", "", "", "sizes"]
    return [helper.make_node("Resize", inputs, ["h"], mode=mode, **attrs)], inits


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("mode, ctm, extra", [
    ("nearest", "asymmetric", {"nearest_mode": "floor"}), ("nearest", "half_pixel", {}),
    ("nearest", "align_corners", {"nearest_mode": "round_prefer_ceil"}),
    ("linear", "half_pixel", {}), ("linear", "align_corners", {}), ("linear", "asymmetric", {}),
    ("linear", "pytorch_half_pixel", {})])
def test_resize_scales(opset, mode, ctm, extra):
    body, inits = _resize(opset, mode, ctm, scales=[1, 1, 2, 1.5], **extra)
    _check(body, (2, 2, 3, 4), (2, 2, 6, 6), inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("mode, ctm", [("nearest", "asymmetric"), ("linear", "half_pixel"), ("linear", "align_corners"),
                                       ("cubic", "half_pixel")])
def test_resize_sizes_up_and_down(opset, mode, ctm):
    body, inits = _resize(opset, mode, ctm, sizes=[2, 2, 7, 3])
    _check(body, (2, 2, 4, 5), (2, 2, 7, 3), inits, opset=opset)


def test_resize_axes_attribute_and_antialias():
    # opset 18: scales for the listed axes only; antialiased linear downsampling.
    body = [helper.make_node("Resize", ["x", "", "scales"], ["h"], mode="linear", axes=[3, 2], antialias=1)]
    _check(body, (2, 1, 6, 8), (2, 1, 3, 4), {"scales": np.array([0.5, 0.5], np.float32)}, opset=18)


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resize_crop_and_resize_with_extrapolation(opset, mode):
    # Samples outside the roi take extrapolation_value: a constant, so no gradient flows there.
    inits = {"roi": np.array([0, 0, 0.2, -0.1, 1, 1, 0.9, 1.2], np.float32), "scales": np.array([1, 1, 1.5, 2], np.float32)}
    body = [helper.make_node("Resize", ["x", "roi", "scales"], ["h"], mode=mode,
                             coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=2.0)]
    _check(body, (2, 2, 4, 3), (2, 2, 6, 6), inits, opset=opset)


@pytest.mark.parametrize("opset", [19, 21])
@pytest.mark.parametrize("mode", ["linear", "cubic", "nearest"])
def test_resize_half_pixel_symmetric_up_and_down(opset, mode):
    body, inits = _resize(opset, mode, "half_pixel_symmetric", scales=[1, 1, 1.7, 0.6])
    _check(body, (2, 2, 3, 5), (2, 2, 5, 3), inits, opset=opset)


@pytest.mark.parametrize("policy, out", [("not_larger", (2, 2, 6, 8)), ("not_smaller", (2, 2, 6, 8))])
def test_resize_keep_aspect_ratio(policy, out):
    # (4, 5) to sizes (6, 8): ratios 1.5 and 1.6; one scale for both axes, outputs round(scale * in).
    body = [helper.make_node("Resize", ["x", "", "", "sizes"], ["h"], mode="linear", keep_aspect_ratio_policy=policy,
                             axes=[2, 3])]
    _check(body, (2, 2, 4, 5), out, {"sizes": _ints(6, 8)}, opset=18)


@pytest.mark.parametrize("opset", [11, 21])
def test_resize_cubic_exclude_outside_rank3_and_rank5(opset):
    body, inits = _resize(opset, "cubic", "asymmetric", scales=[1, 1, 2, 1.5], exclude_outside=1, cubic_coeff_a=-0.5)
    _check(body, (2, 2, 3, 4), (2, 2, 6, 6), inits, opset=opset)
    body, inits = _resize(opset, "linear", "half_pixel", scales=[1, 1, 2.5])
    _check(body, (2, 2, 3), (2, 2, 7), inits, opset=opset)
    body, inits = _resize(opset, "nearest", "asymmetric", scales=[1, 1, 2, 1, 2], nearest_mode="floor")
    _check(body, (2, 2, 2, 2, 2), (2, 2, 4, 2, 4), inits, opset=opset)


def _nearest_1d(x, axis, scale, source, rounding):
    n = x.shape[axis]
    index = rounding(source(np.arange(int(np.floor(n * scale))), scale)).astype(int)
    return np.take(x, np.clip(index, 0, n - 1), axis)


def test_resize_tf_half_pixel_for_nn_opset11():
    # onnx's reference evaluator does not know this opset-11-only mode: numpy oracle.
    body, inits = _resize(11, "nearest", "tf_half_pixel_for_nn", scales=[1, 1, 2, 1.5], nearest_mode="ceil")

    def forward(x):
        for axis, scale in ((2, 2.0), (3, 1.5)):
            x = _nearest_1d(x, axis, scale, lambda i, s: (i + 0.5) / s, np.ceil)
        return x
    _check_numpy(body, inits, forward, (2, 2, 3, 4), opset=11)


def test_resize_opset10():
    # onnx's reference evaluator reads Resize-10's second input (scales) as a roi and fails: numpy
    # oracle (asymmetric coordinates, floor when upsampling).
    body = [helper.make_node("Resize", ["x", "scales"], ["h"], mode="nearest")]

    def forward(x):
        for axis, scale in ((2, 2.0), (3, 1.5)):
            x = _nearest_1d(x, axis, scale, lambda i, s: i / s, np.floor)
        return x
    _check_numpy(body, {"scales": np.array([1, 1, 2, 1.5], np.float32)}, forward, (2, 2, 3, 4), opset=10)


def test_resize_nearest_by_whole_factors_pools():
    body, inits = _resize(13, "nearest", "asymmetric", scales=[1, 1, 2, 3], nearest_mode="floor")
    _check(body, (2, 2, 3, 2), (2, 2, 6, 6), inits, opset=13)


def test_upsample_opset9_nearest():
    body = [helper.make_node("Upsample", ["x", "scales"], ["h"], mode="nearest")]
    _check(body, (2, 2, 3, 2), (2, 2, 6, 6), {"scales": np.array([1, 1, 2, 3], np.float32)}, opset=9)


def _upsample_linear_1d(x, axis, scale):
    # Upsample-9 "linear" as onnxruntime runs it: source coordinate out / scale, clamped at the end.
    n = x.shape[axis]
    src = np.arange(int(n * scale)) / scale
    lo = np.minimum(np.floor(src).astype(int), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.take(x, lo, axis) * (1 - w) + np.take(x, hi, axis) * w


def test_upsample_opset9_linear():
    # onnx's reference evaluator has no Upsample "linear" for these scales ("Not implemented"): numpy oracle.
    body = [helper.make_node("Upsample", ["x", "scales"], ["h"], mode="linear")]
    _check_numpy(body, {"scales": np.array([1, 1, 2, 3], np.float32)},
                 lambda x: _upsample_linear_1d(_upsample_linear_1d(x, 2, 2), 3, 3), (2, 2, 3, 2), opset=9)


def test_resize_linear_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    x = _x(2, 3, 5, 4)
    body, inits = _resize(13, "linear", "half_pixel", scales=[1, 1, 2, 2])
    head, head_inits = _head((2, 3, 10, 8))
    model = make_model(body + head, x.shape, (2, 3), {**inits, **head_inits}, opset=13)
    target = [2, 1]
    values, _ = run_gradient(model, x, target)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    up = torch.nn.functional.interpolate(xt, scale_factor=2, mode="bilinear", align_corners=False)
    scores = up.flatten(1) @ torch.tensor(head_inits["Wfc"]).T + torch.tensor(head_inits["bfc"])
    scores[torch.arange(2), torch.tensor(target)].sum().backward()
    assert_agree(values[grad_name("x")], xt.grad.numpy(), tol=1e-5)


# ---- the batch axis stays free -----------------------------------------------------------------------------
def test_gradient_graph_built_at_one_batch_runs_at_another():
    nodes = [helper.make_node("Concat", ["x", "x"], ["c"], axis=1),
             helper.make_node("Slice", ["c", "st", "en", "ax", "sp"], ["s"]),
             helper.make_node("Pad", ["s", "pads"], ["p"], mode="reflect"),
             helper.make_node("Tile", ["p", "r"], ["t"]),
             helper.make_node("Resize", ["t", "", "scales"], ["u"], mode="linear"),
             helper.make_node("Gather", ["u", "i"], ["h"], axis=1)]
    inits = {"st": _ints(0, -1), "en": _ints(3, -100), "ax": _ints(1, 3), "sp": _ints(1, -2),
             "pads": _ints(0, 0, 1, 1, 0, 0, 1, 1), "r": _ints(1, 1, 1, 2), "scales": np.array([1, 1, 2, 2], np.float32), "i": _ints(2, 0, 2)}
    head, head_inits = _head((2, 3, 10, 20))
    model = make_model(nodes + head, ("N", 2, 3, 5), ("N", 3), {**inits, **head_inits}, opset=13)
    grad_model = build_gradient_model(model, GradientRequest(), (2, 3, 5), batch=2)
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, target = _x(5, 2, 3, 5), np.array([0, 1, 2, 1, 0], np.int64)
    got = session.run([grad_name("x")], {"x": x, TARGET_INPUT: target})[0]
    expected, _ = run_gradient(model, x, target)
    assert_agree(got, expected[grad_name("x")], tol=1e-5)
