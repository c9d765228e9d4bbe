"""Objectives and targets: what scalar a gradient is taken of, defined once for every backend.

An objective is a sum over the model's output of target weights W times a function of the scores:

    objective(y) = sum over the batch and the output of  W * f(y)

    logit            f(y) = y
    softmax          f(y) = softmax(y)                     (over the class axis)
    log_softmax      f(y) = log_softmax(y)
    chainer_prob_ce  f(y) = -log_softmax(softmax(y))       (the Chainer write-up's
                     softmax_cross_entropy applied to the softmax output `prob`)

W comes from the target: the one-hot row of a class index per sample, or of the argmax of the
same pass's output ("argmax_per_sample"), or the mask of a Region of a dense output. Samples stay
independent (eval mode), so the gradient of the batch's sum is each sample's own gradient.

`objective_terms` and `class_weights` are written once, over a handful of array operations that
each backend supplies for its own arrays (`NumpyOps` here; torch tensors, Chainer Variables, and
ONNX nodes that the gradient builder then differentiates like the rest of the graph), so no
backend has its own copy of the formulas. No extra forward pass is needed: the objective is
computed on the output of the same pass.

Targets, as methods take them (one spelling per kind):
- None: the argmax of the output on the clean input (methods that evaluate x at other points,
  noise or a path, decide it with one forward pass first);
- an int, or one int per image: those classes;
- "argmax_per_sample" (ARGMAX_PER_SAMPLE): the argmax recomputed in every pass, noisy samples
  included (the Chainer write-up does this);
- ms.region(channel, box=... or mask=...): the sum of a channel over a region of a dense output.
A backend's run() receives only the last three (int64 indices, ARGMAX_PER_SAMPLE, a Region).
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
    """(W, the class index each sample used or None, the class axis) of a backend's target on its
    output `scores`: a Region's mask, or class_weights of a classifier's (N, classes) output."""
    shape = tuple(ops.shape(scores))
    if isinstance(target, Region):
        return ops.constant(target.weights(shape)), None, Region.class_axis(shape)
    if len(shape) != 2:
        raise MultisalError(f"the model output has shape {shape}; a class target needs (N, classes), "
                            "use ms.region(channel, box=...) for dense outputs")
    if isinstance(target, np.ndarray):
        check_target_range(target, shape[1])
    weights, indices = class_weights(ops, scores, target)
    return weights, indices, 1


def objective_value(ops, scores, objective: str, target):
    """(the sum over the batch of each sample's objective, the class index each sample used or None):
    what a backend differentiates."""
    weights, indices, axis = target_weights(ops, scores, target)
    return ops.total(objective_terms(ops, scores, weights, objective, axis)), indices


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


def objective_from_scores(scores: np.ndarray, objective: str, target) -> np.ndarray:
    """The objective of each sample of a model's outputs, in float64 NumPy, for a backend target:
    class indices or ARGMAX_PER_SAMPLE on (N, classes) scores, or a Region of a dense output. The
    gradient-free methods read their scores off forward passes with it."""
    s = np.asarray(scores, dtype=np.float64)
    weights, _, axis = target_weights(NumpyOps, s, target)
    return objective_terms(NumpyOps, s, weights, objective, axis).reshape(len(s), -1).sum(axis=1)


def target_rows(target, images):
    """A backend target for rows made from images `images` (one image index per row, or a slice):
    each row's class where there is one per image, else the target as it is (ARGMAX_PER_SAMPLE, a
    Region)."""
    return target[images] if isinstance(target, np.ndarray) else target


# ---- targets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """Sum of one output channel over a box or a mask of a dense output.

    For an (N,C,H,W) output the box is (top, left, bottom, right) in output pixels, bottom/right
    exclusive; for a sequence output (N,T,C) the box is (start, stop) over T.
    """

    channel: int
    box: Optional[Tuple[int, ...]] = None
    mask: Optional[np.ndarray] = None

    @staticmethod
    def class_axis(output_shape) -> int:
        """The axis of an output's channels: 1 for (N,C,H,W), the last for (N,T,C)."""
        return 1 if len(output_shape) == 4 else len(output_shape) - 1

    def weights(self, output_shape) -> np.ndarray:
        """A float32 array shaped like one sample's output, 1 where the objective sums."""
        shape = tuple(output_shape[1:])
        if len(shape) == 3:          # (C,H,W)
            spatial, axis = shape[1:], 0
        elif len(shape) == 2:        # (T,C)
            spatial, axis = shape[:1], 1
        else:
            raise MultisalError(
                f"region target needs a dense output (N,C,H,W) or (N,T,C), the model gives {tuple(output_shape)}")
        n_channels = shape[axis]
        if not 0 <= self.channel < n_channels:
            raise MultisalError(f"region channel {self.channel} out of range: the output has {n_channels} channels")
        if self.mask is not None:
            sel = np.asarray(self.mask, dtype=bool)
            if sel.shape != tuple(spatial):
                raise MultisalError(f"region mask has shape {sel.shape}, expected {tuple(spatial)} (the output's spatial size)")
        else:
            sel = np.zeros(spatial, dtype=bool)
            if len(spatial) == 2:
                top, left, bottom, right = self.box
                sel[top:bottom, left:right] = True
            else:
                start, stop = self.box
                sel[start:stop] = True
            if not sel.any():
                raise MultisalError(f"region box {self.box} selects nothing in an output of spatial size {tuple(spatial)}")
        w = np.zeros(shape, dtype=np.float32)
        if axis == 0:
            w[self.channel][sel] = 1.0
        else:
            w[sel, self.channel] = 1.0
        return w


def region(channel: int, box=None, mask=None) -> Region:
    """Target a dense output: the sum of `channel` over `box` or `mask` (give exactly one)."""
    if (box is None) == (mask is None):
        raise MultisalError("region() takes exactly one of box=(top, left, bottom, right) or mask=bool array")
    if box is not None:
        box = tuple(int(v) for v in box)
        if len(box) not in (2, 4):
            raise MultisalError(f"region box {box} must be (top, left, bottom, right) or (start, stop)")
    return Region(int(channel), box=box, mask=None if mask is None else np.asarray(mask, dtype=bool))


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise MultisalError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    return objective


def is_argmax_per_sample(target) -> bool:
    return isinstance(target, str) and target == ARGMAX_PER_SAMPLE


TargetSpec = Union[None, int, list, np.ndarray, str, Region]


def expand_target(target: TargetSpec, n: int):
    """Normalise a method's target for a batch of n inputs.

    Returns None (decide from the clean input), ARGMAX_PER_SAMPLE, a Region, or an int64 array (n,).
    """
    if target is None or isinstance(target, Region) or is_argmax_per_sample(target):
        return target
    if isinstance(target, str):
        raise MultisalError(f"unknown target {target!r}: expected None, an int, a list of ints, "
                            f"{ARGMAX_PER_SAMPLE!r} or ms.region(...)")
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
    """A backend's target for a batch of n: int64 indices (n,), ARGMAX_PER_SAMPLE or a Region."""
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
