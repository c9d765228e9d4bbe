"""Objectives and targets: what scalar a gradient is taken of, defined once for every backend.

An objective is a sum over the model's output of target weights W times a function of the scores:

    objective(y) = sum over the batch and the output of  W * f(y)

    logit            f(y) = y
    softmax          f(y) = softmax(y)                     (over the class axis)
    log_softmax      f(y) = log_softmax(y)
    chainer_prob_ce  f(y) = -log_softmax(softmax(y))       (the Chainer write-up's
                     softmax_cross_entropy applied to the softmax output `prob`)

W comes from the target: the one-hot row of a class index per sample, or of the argmax of the
same pass's output ("argmax_per_sample"), or the mask of a Region of a dense output. For
Detections of a YOLO-style output f applies to the class scores (times the objectness for YOLOv5)
and W is class c's one-hot times a mask of the anchors whose decoded box overlaps the given box,
computed from the same pass's box values (no gradient flows through the mask, as none flows
through an argmax). Samples stay independent (eval mode), so the gradient of the batch's sum is
each sample's own gradient.

`objective_terms`, `class_weights` and `detection_terms` are written once, over a handful of array
operations that each backend supplies for its own arrays (`NumpyOps` here; torch tensors, Chainer
Variables, and ONNX nodes that the gradient builder then differentiates like the rest of the
graph), so no
backend has its own copy of the formulas. No extra forward pass is needed: the objective is
computed on the output of the same pass.

Targets, as methods take them (one spelling per kind):
- None: the argmax of the output on the clean input (methods that evaluate x at other points,
  noise or a path, decide it with one forward pass first);
- an int, or one int per image: those classes;
- "argmax_per_sample" (ARGMAX_PER_SAMPLE): the argmax recomputed in every pass, noisy samples
  included (the Chainer write-up does this);
- ms.region(channel, box=... or mask=..., axis=...): the sum of a channel over a region of a dense output;
- ms.detections(class, box=..., iou=0.5): the sum of a class's score over the detections in a box.
A backend's run() receives only the last four (int64 indices, ARGMAX_PER_SAMPLE, a Region,
Detections).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from .errors import MultisalError

OBJECTIVES = ("logit", "softmax", "log_softmax", "chainer_prob_ce")

# The target kind whose class is decided in each pass from that pass's output.
ARGMAX_PER_SAMPLE = "argmax_per_sample"


# ---- the one definition ----------------------------------------------------------------------------
def objective_scores(ops, scores, objective: str, class_axis: int):
    """f(scores) of the objective, elementwise along the class axis."""
    if objective == "logit":
        return scores
    if objective == "softmax":
        return ops.softmax(scores, class_axis)
    if objective == "log_softmax":
        return ops.log_softmax(scores, class_axis)
    if objective == "chainer_prob_ce":
        return ops.neg(ops.log_softmax(ops.softmax(scores, class_axis), class_axis))
    raise MultisalError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")


def objective_terms(ops, scores, weights, objective: str, class_axis: int):
    """W * f(scores): a sample's objective is the sum of its terms, and a backend differentiates the
    sum over the whole batch (ops.total)."""
    return ops.mul(objective_scores(ops, scores, objective, class_axis), weights)


def class_weights(ops, scores, target):
    """(W, indices) for a class target of an (N, classes) output: the one-hot rows of the target's
    class indices, or of this pass's argmax for ARGMAX_PER_SAMPLE (no gradient flows through it)."""
    indices = ops.argmax(scores, 1) if is_argmax_per_sample(target) else ops.indices(target)
    return ops.one_hot(indices, ops.shape(scores)[1]), indices


def target_weights(ops, scores, target):
    """(W, the class index each sample used or None, the class axis) of a class or Region target on
    the output `scores`: a Region's mask, or class_weights of a classifier's (N, classes) output."""
    shape = tuple(ops.shape(scores))
    if isinstance(target, Region):
        return ops.constant(target.weights(shape)), None, Region.class_axis(shape, target.axis)
    if isinstance(target, Detections):
        raise MultisalError("target_weights takes class and region targets; detections go through target_terms")
    if len(shape) != 2:
        raise MultisalError(f"the model output has shape {shape}; a class target needs (N, classes), "
                            "use ms.region(channel, box=...) for dense outputs")
    if isinstance(target, np.ndarray):
        check_target_range(target, shape[1])
    weights, indices = class_weights(ops, scores, target)
    return weights, indices, 1


def target_terms(ops, output, objective: str, target):
    """(W * f, the class index each sample used or None) of any backend target: a sample's
    objective is the sum of its terms. W is d objective / d f, and no gradient flows through it."""
    if isinstance(target, Detections):
        shape = tuple(ops.shape(output))
        f, weights = detection_terms(ops, output, objective, target.decoding(shape), ops.constant(target.box_array()),
                                     ops.constant(target.iou_array()), ops.constant(target.class_weights(shape)))
        return ops.mul(f, weights), None
    weights, indices, axis = target_weights(ops, output, target)
    return objective_terms(ops, output, weights, objective, axis), indices


def objective_value(ops, scores, objective: str, target):
    """(the sum over the batch of each sample's objective, the class index each sample used or None):
    what a backend differentiates."""
    terms, indices = target_terms(ops, scores, objective, target)
    return ops.total(terms), indices


# ---- detections ------------------------------------------------------------------------------------
def detection_terms(ops, output, objective: str, decoding, box, iou, class_weights):
    """(f, W) of a Detections target on a YOLO-style output, written once for every backend.

    `decoding` is (the axis of the values, whether an objectness value comes after the box): the
    values of an anchor are cx, cy, w, h (input pixels), [objectness,] then one score per class.
    `box` holds (x1, y1, x2, y2), `iou` the threshold, `class_weights` the class's one-hot shaped to
    broadcast against the class scores: arrays of the backend (constants, or a graph's inputs).
    f is the objective's function of the class scores (times the objectness for YOLOv5); W is the
    one-hot times 1 where an anchor's decoded box overlaps `box` by IoU >= iou. The overlap is
    tested without a division: intersection >= iou * union.
    """
    axis, objectness = decoding
    n_values = ops.shape(output)[axis]
    first_class = 5 if objectness else 4
    scores = ops.take(output, axis, first_class, n_values)
    if objectness:
        scores = ops.mul(scores, ops.take(output, axis, 4, 5))
    values = ops.stop_gradient(output)
    cx, cy, w, h = (ops.take(values, axis, i, i + 1) for i in range(4))
    bx1, by1, bx2, by2 = (ops.take(box, 0, i, i + 1) for i in range(4))
    half_w, half_h = ops.mul(w, ops.constant(np.float32(0.5))), ops.mul(h, ops.constant(np.float32(0.5)))
    zero = ops.constant(np.float32(0.0))

    def overlap(center, half, low, high):
        return ops.maximum(ops.sub(ops.minimum(ops.add(center, half), high), ops.maximum(ops.sub(center, half), low)),
                           zero)

    inter = ops.mul(overlap(cx, half_w, bx1, bx2), overlap(cy, half_h, by1, by2))
    union = ops.sub(ops.add(ops.mul(w, h), ops.mul(ops.sub(bx2, bx1), ops.sub(by2, by1))), inter)
    mask = ops.at_least(inter, ops.mul(iou, union))
    return objective_scores(ops, scores, objective, axis), ops.mul(mask, class_weights)


class NumpyOps:
    """The objective's operations on NumPy arrays (float64), for reference values and NumPy backends."""

    @staticmethod
    def softmax(x, axis):
        z = np.exp(x - x.max(axis, keepdims=True))
        return z / z.sum(axis, keepdims=True)

    @staticmethod
    def log_softmax(x, axis):
        z = x - x.max(axis, keepdims=True)
        return z - np.log(np.exp(z).sum(axis, keepdims=True))

    neg = staticmethod(np.negative)
    mul = staticmethod(np.multiply)
    total = staticmethod(np.sum)

    @staticmethod
    def argmax(x, axis):
        return x.argmax(axis)

    @staticmethod
    def indices(target):
        return np.asarray(target, dtype=np.int64)

    @staticmethod
    def one_hot(indices, n):
        return np.eye(n)[indices]

    @staticmethod
    def shape(x):
        return x.shape

    @staticmethod
    def constant(array):
        return np.asarray(array, dtype=np.float64)

    @staticmethod
    def take(x, axis, start, stop):
        return x[(slice(None),) * axis + (slice(start, stop),)]

    add = staticmethod(np.add)
    sub = staticmethod(np.subtract)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def at_least(a, b):
        return (a >= b).astype(np.float64)

    @staticmethod
    def stop_gradient(x):
        return x


def objective_from_scores(scores: np.ndarray, objective: str, target) -> np.ndarray:
    """The objective of each sample of a model's outputs, in float64 NumPy, for a backend target:
    class indices or ARGMAX_PER_SAMPLE on (N, classes) scores, a Region of a dense output or
    Detections. The gradient-free methods read their scores off forward passes with it."""
    s = np.asarray(scores, dtype=np.float64)
    terms, _ = target_terms(NumpyOps, s, objective, target)
    return terms.reshape(len(s), -1).sum(axis=1)


def target_rows(target, images):
    """A backend target for rows made from images `images` (one image index per row, or a slice):
    each row's class where there is one per image, else the target as it is (ARGMAX_PER_SAMPLE, a
    Region)."""
    return target[images] if isinstance(target, np.ndarray) else target


# ---- targets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """Sum of one output channel over a box or a mask of a dense output.

    `axis` is the output's axis that holds the channels (classes); the positions are its other
    axes after the batch, in order. By default the channels are axis 1 of a 4-D output (N,C,H,W)
    and the last axis of any other, (N,T,C) for a sequence. The box gives a start for each
    position axis, then a stop for each (stops exclusive): (top, left, bottom, right) in output
    pixels over (H,W), (start, stop) over T; the mask has the positions' shape.
    """

    channel: int
    box: Optional[Tuple[int, ...]] = None
    mask: Optional[np.ndarray] = None
    axis: Optional[int] = None

    @staticmethod
    def class_axis(output_shape, axis=None) -> int:
        """The axis of an output's channels: `axis` (negative counts from the end), else 1 for
        (N,C,H,W) and the last one for any other rank."""
        rank = len(output_shape)
        if axis is None:
            return 1 if rank == 4 else rank - 1
        if not -rank < axis < rank or axis % rank == 0:
            raise MultisalError(f"region axis {axis} does not fit an output of shape {tuple(output_shape)}: "
                                f"expected the axis of its channels, 1..{rank - 1} (0 is the batch)")
        return axis % rank

    def weights(self, output_shape) -> np.ndarray:
        """A float32 array shaped like one sample's output, 1 where the objective sums."""
        if len(output_shape) < 3:
            raise MultisalError(f"region target needs a dense output (N,C,H,W), (N,T,C) or another layout with "
                                f"positions and channels, the model gives {tuple(output_shape)}")
        axis = self.class_axis(output_shape, self.axis) - 1      # in one sample's shape
        shape = tuple(output_shape[1:])
        spatial = shape[:axis] + shape[axis + 1:]
        n_channels = shape[axis]
        if not 0 <= self.channel < n_channels:
            raise MultisalError(f"region channel {self.channel} out of range: the output has {n_channels} channels "
                                f"along axis {axis + 1}")
        if self.mask is not None:
            sel = np.asarray(self.mask, dtype=bool)
            if sel.shape != tuple(spatial):
                raise MultisalError(f"region mask has shape {sel.shape}, expected {tuple(spatial)} (the output's spatial size)")
        else:
            if len(self.box) != 2 * len(spatial):
                raise MultisalError(f"region box {self.box} has {len(self.box)} numbers; an output of positions "
                                    f"{tuple(spatial)} needs {2 * len(spatial)} (a start for each axis, then a stop)")
            sel = np.zeros(spatial, dtype=bool)
            k = len(spatial)
            sel[tuple(slice(a, b) for a, b in zip(self.box[:k], self.box[k:]))] = True
            if not sel.any():
                raise MultisalError(f"region box {self.box} selects nothing in an output of spatial size {tuple(spatial)}")
        w = np.zeros(shape, dtype=np.float32)
        np.moveaxis(w, axis, 0)[self.channel][sel] = 1.0
        return w


def region(channel: int, box=None, mask=None, axis: Optional[int] = None) -> Region:
    """Target a dense output: the sum of `channel` over `box` or `mask` (give exactly one); `axis`
    is the output's channel axis where the default (1 for 4-D outputs, else the last) is not it."""
    if (box is None) == (mask is None):
        raise MultisalError("region() takes exactly one of box=(top, left, bottom, right) or mask=bool array")
    if box is not None:
        box = tuple(int(v) for v in box)
        if not box or len(box) % 2:
            raise MultisalError(f"region box {box} must be (top, left, bottom, right), (start, stop) or a start and a "
                                "stop for each position axis")
    if axis is not None and (not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or axis == 0):
        raise MultisalError(f"region axis {axis!r}: expected the output's channel axis, an int other than 0 "
                            "(the batch)")
    return Region(int(channel), box=box, mask=None if mask is None else np.asarray(mask, dtype=bool),
                  axis=None if axis is None else int(axis))


DETECTION_FORMATS = {"yolov8": False, "yolov5": True}   # format -> whether an objectness value follows the box


@dataclass(frozen=True)
class Detections:
    """The sum of class `channel`'s score over the anchors of a YOLO-style output whose decoded box
    overlaps `box` by an IoU of at least `iou`.

    The output is (N, values, anchors) (YOLOv8's export) or (N, anchors, values) (YOLOv5's), an
    anchor's values being cx, cy, w, h in input pixels, then for "yolov5" an objectness, then one
    score per class. A class's score is that value ("yolov8") or the objectness times it
    ("yolov5"), as the formats' own post-processing scores detections. `box` is (x1, y1, x2, y2)
    in input pixels; `axis` the axis of the values, by default the shorter of axes 1 and 2.
    """

    channel: int
    box: Tuple[float, float, float, float]
    iou: float = 0.5
    format: str = "yolov8"
    axis: Optional[int] = None

    def describe(self) -> str:
        return f"detection target (class {self.channel}, box {list(self.box)}, {self.format})"

    def decoding(self, output_shape) -> Tuple[int, bool]:
        """(the axis of an anchor's values, whether they hold an objectness) for this output; one line
        naming the target and what was expected where the output is not YOLO-style."""
        shape = tuple(output_shape)
        objectness = DETECTION_FORMATS[self.format]
        first_class = 5 if objectness else 4
        if len(shape) != 3:
            raise MultisalError(f"{self.describe()}: expected a YOLO-style output (N, {first_class} + classes, "
                                f"anchors) or (N, anchors, {first_class} + classes), the model gives {shape}")
        axis = self.axis % 3 if self.axis is not None else (1 if shape[1] <= shape[2] else 2)
        n_classes = shape[axis] - first_class
        if n_classes <= 0:
            raise MultisalError(f"{self.describe()}: axis {axis} of the output {shape} holds {shape[axis]} values an "
                                f"anchor; {self.format} needs {first_class} box values and at least one class score")
        if not 0 <= self.channel < n_classes:
            raise MultisalError(f"{self.describe()}: class {self.channel} out of range: the output {shape} has "
                                f"{n_classes} classes (0..{n_classes - 1})")
        return axis, objectness

    def class_weights(self, output_shape) -> np.ndarray:
        """The class's one-hot, shaped to broadcast against the class scores (float32)."""
        axis, objectness = self.decoding(output_shape)
        n_classes = output_shape[axis] - (5 if objectness else 4)
        onehot = np.zeros(n_classes, np.float32)
        onehot[self.channel] = 1.0
        return onehot.reshape(-1, 1) if axis == 1 else onehot

    def box_array(self) -> np.ndarray:
        return np.asarray(self.box, np.float32)

    def iou_array(self) -> np.ndarray:
        return np.asarray([self.iou], np.float32)

    def check_input(self, input_shape) -> None:
        """One line when the box lies outside the (N, C, H, W) input. A box may reach past the
        image's edges, as a detector's own boxes do near them."""
        height, width = input_shape[-2:]
        x1, y1, x2, y2 = self.box
        if not (x1 < width and x2 > 0 and y1 < height and y2 > 0):
            raise MultisalError(f"{self.describe()}: the box lies outside the {height}x{width} input: expected "
                                f"(x1, y1, x2, y2) in input pixels overlapping (0, 0, {width}, {height})")


def detections(channel: int, box, iou: float = 0.5, format: str = "yolov8", axis: Optional[int] = None) -> Detections:
    """Target a YOLO-style detector: the sum of class `channel`'s score over the anchors whose decoded
    box overlaps `box` = (x1, y1, x2, y2), in input pixels, by an IoU of at least `iou`; `format`
    "yolov8" (cx, cy, w, h, class scores) or "yolov5" (cx, cy, w, h, objectness, class scores)."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not all(np.isfinite(values)) or not (values[0] < values[2] and values[1] < values[3]):
        raise MultisalError(f"detection box {box!r}: expected (x1, y1, x2, y2) in input pixels with x1 < x2 and y1 < y2")
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or channel < 0:
        raise MultisalError(f"detection class {channel!r}: expected a class index >= 0")
    if isinstance(iou, bool) or not isinstance(iou, (int, float, np.floating)) or not 0 < iou <= 1:
        raise MultisalError(f"detection iou {iou!r}: expected a number in (0, 1]")
    if format not in DETECTION_FORMATS:
        raise MultisalError(f"detection format {format!r}: expected one of {', '.join(DETECTION_FORMATS)}")
    if axis is not None and (isinstance(axis, bool) or axis not in (1, 2, -1, -2)):
        raise MultisalError(f"detection axis {axis!r}: expected the axis of an anchor's values, 1 or 2")
    return Detections(int(channel), box=tuple(values), iou=float(iou), format=format,
                      axis=None if axis is None else int(axis))


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise MultisalError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    return objective


def is_argmax_per_sample(target) -> bool:
    return isinstance(target, str) and target == ARGMAX_PER_SAMPLE


TargetSpec = Union[None, int, list, np.ndarray, str, Region, Detections]


def expand_target(target: TargetSpec, n: int):
    """Normalise a method's target for a batch of n inputs.

    Returns None (decide from the clean input), ARGMAX_PER_SAMPLE, a Region, Detections, or an
    int64 array (n,).
    """
    if target is None or isinstance(target, (Region, Detections)) or is_argmax_per_sample(target):
        return target
    if isinstance(target, str):
        raise MultisalError(f"unknown target {target!r}: expected None, an int, a list of ints, "
                            f"{ARGMAX_PER_SAMPLE!r}, ms.region(...) or ms.detections(...)")
    arr = np.asarray(target)
    if arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise MultisalError(f"target {target!r} must be an int or one int per image")
    if arr.ndim == 0:
        arr = np.full(n, int(arr), dtype=np.int64)
    if arr.shape != (n,):
        raise MultisalError(f"target has {arr.shape[0]} entries for {n} images: give one int per image")
    if (arr < 0).any():
        raise MultisalError(f"target {arr.tolist()} has a negative class index")
    return arr.astype(np.int64)


def check_target(target, n: int):
    """A backend's target for a batch of n: int64 indices (n,), ARGMAX_PER_SAMPLE, a Region or Detections."""
    if target is None:
        raise MultisalError(f"run() with an objective needs a target (class indices, {ARGMAX_PER_SAMPLE!r} "
                            "or a region)")
    return expand_target(target, n)


def check_target_range(target: np.ndarray, n_classes: int) -> None:
    """Backends call this once the output size is known."""
    bad = target[(target < 0) | (target >= n_classes)]
    if bad.size:
        raise MultisalError(f"target {int(bad[0])} out of range: the model has {n_classes} classes (0..{n_classes - 1})")


def clean_target(be, x: np.ndarray, target: TargetSpec):
    """The backend target for methods that evaluate x at other points (noise, paths).

    None means the argmax of the output on the clean input, decided by one forward pass.
    """
    t = expand_target(target, len(x))
    if t is None:
        return be.predict(x).argmax(axis=1).astype(np.int64)
    return t


def same_pass_target(target: TargetSpec, n: int):
    """The backend target for methods whose one pass is on the clean input: None -> that pass's argmax."""
    t = expand_target(target, n)
    return ARGMAX_PER_SAMPLE if t is None else t
