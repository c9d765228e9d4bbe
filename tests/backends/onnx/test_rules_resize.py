"""Gradient rules of Resize and Upsample (rules/resize.py), against float64 finite differences
(onnx's reference evaluator, or numpy where it falls short), and bilinear upsampling against torch."""
import functools

import numpy as np
import pytest
from onnx import helper

from helpers import assert_agree
from multisal.backends.onnx.grad.builder import grad_name
from onnx_fd import check_body, check_body_against_numpy, classifier_head, ints, make_model, run_gradient

RNG = np.random.default_rng(1)
OPSETS = [11, 13, 18, 21]
_check = functools.partial(check_body, rng=RNG)


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
    _check(body, (2, 2, 4, 5), out, {"sizes": ints(6, 8)}, opset=18)


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
    check_body_against_numpy(body, inits, forward, (2, 2, 3, 4), RNG, opset=11)


def test_resize_opset10():
    # onnx's reference evaluator reads Resize-10's second input (scales) as a roi and fails: numpy
    # oracle (asymmetric coordinates, floor when upsampling).
    body = [helper.make_node("Resize", ["x", "scales"], ["h"], mode="nearest")]

    def forward(x):
        for axis, scale in ((2, 2.0), (3, 1.5)):
            x = _nearest_1d(x, axis, scale, lambda i, s: i / s, np.floor)
        return x
    check_body_against_numpy(body, {"scales": np.array([1, 1, 2, 1.5], np.float32)}, forward, (2, 2, 3, 4), RNG,
                             opset=10)


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
    check_body_against_numpy(body, {"scales": np.array([1, 1, 2, 3], np.float32)},
                             lambda x: _upsample_linear_1d(_upsample_linear_1d(x, 2, 2), 3, 3), (2, 2, 3, 2), RNG, opset=9)


def test_resize_linear_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((2, 3, 5, 4)).astype(np.float32)
    body, inits = _resize(13, "linear", "half_pixel", scales=[1, 1, 2, 2])
    head, head_inits = classifier_head((2, 3, 10, 8), RNG)
    model = make_model(body + head, x.shape, (2, 3), {**inits, **head_inits}, opset=13)
    target = [2, 1]
    values, _ = run_gradient(model, x, target)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    up = torch.nn.functional.interpolate(xt, scale_factor=2, mode="bilinear", align_corners=False)
    scores = up.flatten(1) @ torch.tensor(head_inits["Wfc"]).T + torch.tensor(head_inits["bfc"])
    scores[torch.arange(2), torch.tensor(target)].sum().backward()
    assert_agree(values[grad_name("x")], xt.grad.numpy(), tol=1e-5)
