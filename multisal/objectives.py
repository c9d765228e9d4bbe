"""Objectives and targets: what scalar a gradient is taken of.

The objective is a function of the model output and a target class. Backends compute it inside
their own graph (no extra forward pass); this module only validates and normalises the request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from .errors import MultisalError

OBJECTIVES = ("logit", "softmax", "log_softmax", "chainer_prob_ce")

# A target handed to a backend: per-sample class indices, "argmax" (decided by the backend from the
# output of the same pass), or a Region of a dense output.
ARGMAX = "argmax"


@dataclass(frozen=True)
class Region:
    """Sum of one output channel over a box or a mask of a dense output.

    For an (N,C,H,W) output the box is (top, left, bottom, right) in output pixels, bottom/right
    exclusive; for a sequence output (N,T,C) the box is (start, stop) over T.
    """

    channel: int
    box: Optional[Tuple[int, ...]] = None
    mask: Optional[np.ndarray] = None

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


TargetSpec = Union[None, int, list, np.ndarray, str, Region]


def expand_target(target: TargetSpec, n: int):
    """Normalise a user target for a batch of n inputs.

    Returns None (decide from the clean input), ARGMAX (decide per pass), a Region, or an int64
    array of shape (n,).
    """
    if target is None or isinstance(target, Region):
        return target
    if isinstance(target, str):
        if target == "argmax_per_sample":
            return ARGMAX
        raise MultisalError(f"unknown target {target!r}: expected None, an int, a list of ints, "
                            "'argmax_per_sample' or ms.region(...)")
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


def check_target_range(target: np.ndarray, n_classes: int) -> None:
    """Backends call this once the output size is known."""
    bad = target[(target < 0) | (target >= n_classes)]
    if bad.size:
        raise MultisalError(f"target {int(bad[0])} out of range: the model has {n_classes} classes (0..{n_classes - 1})")


def objective_from_scores(scores: np.ndarray, objective: str, target: np.ndarray) -> np.ndarray:
    """Reference value of the objective per sample, in NumPy (used by tests and the ONNX builder's checks)."""
    s = scores.astype(np.float64)
    idx = np.arange(len(s))
    if objective == "logit":
        return s[idx, target]
    z = s - s.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    if objective == "softmax":
        return np.exp(logp)[idx, target]
    if objective == "log_softmax":
        return logp[idx, target]
    prob = np.exp(logp)
    z2 = prob - prob.max(1, keepdims=True)
    return -(z2 - np.log(np.exp(z2).sum(1, keepdims=True)))[idx, target]


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
    return ARGMAX if t is None else t
