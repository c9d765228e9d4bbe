"""Detection targets (ms.detections) and regions of any layout (ms.region(..., axis=...)) on the
torch backend, against float64 autograd of the meaning written out in tests/detection_reference.py."""
import copy

import numpy as np
import pytest
import torch

import multisal as ms
from detection_reference import detection_objective
from tiny_models import TinyYolo
from helpers import assert_agree


def _values_first(out, format):
    return out.transpose(1, 2) if format == "yolov5" else out


def _box_of_top_anchor(net, x, channel):
    """(x1, y1, x2, y2) of the anchor with the highest score for `channel` on the first image."""
    with torch.no_grad():
        v = _values_first(net(torch.from_numpy(x[:1])), net.format)[0].double()
    first = 5 if net.format == "yolov5" else 4
    a = int(v[first + channel].argmax())
    cx, cy, w, h = (float(v[i, a]) for i in range(4))
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


@pytest.mark.parametrize("format", ["yolov8", "yolov5"])
def test_detection_gradient_is_autograds_of_the_boxes_class_score(format):
    torch.manual_seed(0)
    net = TinyYolo(n_classes=3, format=format).eval()
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    box = _box_of_top_anchor(net, x, 2)
    be = ms.load_backend("torch", model=net)
    got = be.run(x, "logit", ms.detections(2, box=box, iou=0.3, format=format), input_grad=True).input_grad
    xt = torch.from_numpy(x).double().requires_grad_(True)
    value = detection_objective(_values_first(copy.deepcopy(net).double()(xt), format), 2, box, 0.3, format == "yolov5",
                                as_array=torch.from_numpy)
    assert value[0] > 0
    (expected,) = torch.autograd.grad(value.sum(), xt)
    assert_agree(got, expected.numpy())
    # The same, read through the methods, and a box no decoded box overlaps: nothing to explain.
    assert_agree(ms.vanilla_gradient(be, x, ms.detections(2, box=box, iou=0.3, format=format), channel_reduce=None,
                                     abs=False), expected.numpy())
    empty = be.run(x, "logit", ms.detections(2, box=(0, 0, 0.5, 0.5), format=format), input_grad=True).input_grad
    assert not empty.any()


def test_detection_bad_inputs_say_what_was_expected():
    torch.manual_seed(0)
    x = np.zeros((1, 3, 32, 32), np.float32)
    detector = ms.load_backend("torch", model=TinyYolo().eval())
    classifier = ms.load_backend("torch", model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)))
    with pytest.raises(ms.MultisalError, match=r"detection target \(class 0.*box lies outside the 32x32 input"):
        detector.run(x, "logit", ms.detections(0, box=(33, 10, 40, 20)), input_grad=True)
    with pytest.raises(ms.MultisalError, match=r"detection target \(class 0.*expected a YOLO-style output.*\(1, 5\)"):
        classifier.run(x, "logit", ms.detections(0, box=(0, 0, 8, 8)), input_grad=True)
    with pytest.raises(ms.MultisalError, match=r"class 3 out of range: the output \(1, 7, 64\) has 3 classes"):
        detector.run(x, "logit", ms.detections(3, box=(0, 0, 8, 8)), input_grad=True)
    for bad, message in [(dict(box=(5, 5, 1, 9)), "x1 < x2"), (dict(box=(0, 0, 1)), "x1, y1, x2, y2"),
                         (dict(box=(0, 0, 1, 1), iou=0), r"iou 0: expected a number in \(0, 1\]"),
                         (dict(box=(0, 0, 1, 1), format="yolov7"), "expected one of yolov8, yolov5")]:
        with pytest.raises(ms.MultisalError, match=message):
            ms.detections(0, **bad)


def test_region_with_an_axis_sums_a_channel_over_positions_of_any_layout():
    """The YOLO output (N, 4 + C, anchors) read as a dense output: class scores on axis 1, anchors
    the positions; and an NHWC (N, H, W, C) output with its channels last."""
    torch.manual_seed(0)
    net = TinyYolo(n_classes=3).eval()
    x = np.random.default_rng(1).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    be = ms.load_backend("torch", model=net)
    got = be.run(x, "softmax", ms.region(5, box=(10, 30), axis=1), input_grad=True).input_grad
    xt = torch.from_numpy(x).double().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.softmax(copy.deepcopy(net).double()(xt), 1)[:, 5, 10:30].sum(), xt)
    assert_agree(got, expected.numpy())

    nhwc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh()).eval()
    be = ms.load_backend("torch", model=torch.nn.Sequential(nhwc, _ChannelsLast()))
    got = be.run(x, "logit", ms.region(2, box=(3, 4, 9, 12), axis=-1), input_grad=True).input_grad
    xt = torch.from_numpy(x).requires_grad_(True)
    (expected,) = torch.autograd.grad(nhwc(xt)[:, 2, 3:9, 4:12].sum(), xt)
    assert_agree(got, expected.numpy(), tol=1e-5)
    with pytest.raises(ms.MultisalError, match=r"region axis 4 does not fit an output of shape \(2, 32, 32, 4\)"):
        be.run(x, "logit", ms.region(2, box=(3, 4, 9, 12), axis=4), input_grad=True)
    with pytest.raises(ms.MultisalError, match="region box .* has 2 numbers; an output of positions"):
        be.run(x, "logit", ms.region(2, box=(3, 4), axis=3), input_grad=True)


class _ChannelsLast(torch.nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)
