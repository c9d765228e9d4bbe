"""Detection targets on the onnx backend: the YOLOv8 export nudenet ships (320n.onnx, 18 classes,
output (N, 22, anchors)) against float64 finite differences of the detection objective written
out in tests/detection_reference.py, on a box with detections and on one without; and a YOLOv5
layout (objectness) and a region with a channel axis on an export of the tiny torch detector."""
import copy
import importlib.util
import os

import numpy as np
import pytest
import torch

import multisal as ms
from detection_reference import detection_objective
from tiny_models import TinyYolo
from helpers import assert_agree

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
SIZE = 64   # 8x8 + 4x4 + 2x2 = 84 anchors


@pytest.fixture(scope="module")
def nudenet():
    """(the backend, a float64 reference forward, a 64x64 photo in [0, 1])."""
    from onnx.reference import ReferenceEvaluator
    from skimage.transform import resize
    from onnx_fd import to_float64
    spec = importlib.util.find_spec("nudenet")
    if spec is None:
        pytest.skip("nudenet is not installed (the dev extra has it)")
    path = os.path.join(spec.submodule_search_locations[0], "320n.onnx")
    photo = resize(__import__("skimage.data").data.astronaut(), (SIZE, SIZE), anti_aliasing=True)
    x = photo.transpose(2, 0, 1)[None].astype(np.float32)
    reference = ReferenceEvaluator(to_float64(onnx.load(path)))
    return ms.load_backend("onnx", model=path), lambda v: reference.run(None, {"images": v})[0], x


def test_the_nudenet_export_gives_yolov8s_layout(nudenet):
    be, forward, x = nudenet
    out = be.predict(x)
    assert out.shape == (1, 4 + 18, 84)
    assert_agree(out, forward(x.astype(np.float64)), tol=1e-5)


def test_detection_gradient_agrees_with_float64_finite_differences(nudenet):
    be, forward, x = nudenet
    out = forward(x.astype(np.float64))[0]
    channel, anchor = np.unravel_index(out[4:].argmax(), out[4:].shape)
    cx, cy, w, h = out[:4, anchor]
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    target = ms.detections(int(channel), box=box, iou=0.5)
    got = be.run(x, "logit", target, input_grad=True).input_grad[0]

    def objective(v):
        return float(detection_objective(forward(v), int(channel), box, 0.5)[0])

    x64 = x.astype(np.float64)
    assert objective(x64) > out[4 + channel, anchor] > 0.05        # the box holds that detection and its neighbours
    rng = np.random.default_rng(0)
    # Central differences at the 8 largest gradient elements and 4 random ones, and along 2 random
    # directions (each evaluation is a float64 forward pass of onnx's reference evaluator).
    elements = list(np.argsort(-np.abs(got).ravel())[:8]) + list(rng.choice(got.size, 4, replace=False))
    step = 1e-3
    expected, actual = [], []
    for flat in elements:
        e = np.zeros(got.size)
        e[flat] = step
        e = e.reshape(1, *got.shape)
        expected.append((objective(x64 + e) - objective(x64 - e)) / (2 * step))
        actual.append(got.ravel()[flat])
    for _ in range(2):
        d = rng.standard_normal(got.shape)
        d /= np.linalg.norm(d)
        expected.append((objective(x64 + step * d) - objective(x64 - step * d)) / (2 * step))
        actual.append(float((got * d).sum()))
    assert_agree(np.array(actual), np.array(expected))


def test_a_box_without_detections_has_a_zero_gradient(nudenet):
    be, forward, x = nudenet
    box = (0, 0, 1.5, 1.5)   # no decoded box is within an IoU of 0.5 of a 1.5-pixel corner
    assert detection_objective(forward(x.astype(np.float64)), 1, box)[0] == 0
    got = be.run(x, "logit", ms.detections(1, box=box), input_grad=True).input_grad
    assert got.shape == x.shape and not got.any()
    cam = ms.gradcam(be, x, ms.detections(1, box=box), layer=be.default_layer(x.shape[1:]), normalize=False)
    assert not cam.any()


def test_a_classifier_output_is_refused_in_one_line(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    net(torch.zeros(1, 3, 16, 16))
    path = tmp_path / "classifier.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "N"}})
    be = ms.load_backend("onnx", model=str(path))
    with pytest.raises(ms.MultisalError, match=r"^detection target \(class 0, box .*expected a YOLO-style output "
                                               r"\(N, 4 \+ classes, anchors\) .* gives \(\d, 5\)$"):
        be.run(np.zeros((1, 3, 16, 16), np.float32), "logit", ms.detections(0, box=(0, 0, 4, 4)), input_grad=True)


@pytest.fixture(scope="module")
def yolov5_export(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyYolo(n_classes=3, format="yolov5").eval()
    path = tmp_path_factory.mktemp("yolov5") / "tiny_yolov5.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "N"}})
    return net, ms.load_backend("onnx", model=str(path))


def test_yolov5_objectness_and_anchors_first_layout(yolov5_export):
    net, be = yolov5_export
    x = np.random.default_rng(3).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    ref = copy.deepcopy(net).double()
    with torch.no_grad():
        v = ref(torch.from_numpy(x).double()).transpose(1, 2)[0]
    a = int((v[5 + 1] * v[4]).argmax())
    cx, cy, w, h = (float(v[i, a]) for i in range(4))
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    got = be.run(x, "logit", ms.detections(1, box=box, iou=0.4, format="yolov5"), input_grad=True).input_grad
    xt = torch.from_numpy(x).double().requires_grad_(True)
    value = detection_objective(ref(xt).transpose(1, 2), 1, box, 0.4, True, as_array=torch.from_numpy)
    (expected,) = torch.autograd.grad(value.sum(), xt)
    assert np.abs(expected.numpy()).max() > 0
    assert_agree(got, expected.numpy())


def test_a_region_with_a_channel_axis_on_onnx(yolov5_export):
    """ms.region(..., axis=1) on the (N, anchors, values) output: softmax over axis 1."""
    net, be = yolov5_export
    x = np.random.default_rng(4).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    got = be.run(x, "softmax", ms.region(3, box=(4, 8), axis=1), input_grad=True).input_grad
    xt = torch.from_numpy(x).double().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.softmax(copy.deepcopy(net).double()(xt), 1)[:, 3, 4:8].sum(), xt)
    assert_agree(got, expected.numpy())
