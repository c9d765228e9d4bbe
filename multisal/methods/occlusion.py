"""Occlusion (Zeiler and Fergus 2014): how much the target's score drops when a window of the input
is set to a baseline, slid over the image as Captum's Occlusion slides it."""
import itertools

import numpy as np

from ..backend import check_baseline, check_input, samples_per_call
from ..errors import MultisalError
from ..maps import check_channel_reduce, reduce_channels, scale_01
from ..objectives import check_objective, objective_from_scores
from .perturb import clean_pass_target, perturbed_scores

# More window positions per image than this is a typo (each is one forward pass).
MAX_WINDOWS = 100_000


def occlusion(be, x, target=None, window=(3, 16, 16), stride=(3, 8, 8), baseline=0.0, objective="logit",
              channel_reduce="mean", normalize=True, batch_size=None, progress=False):
    r"""Occlusion (Zeiler et al. 2014): the drop of the target's score when a sliding window is set to a baseline.

    Zeiler and Fergus 2014, "Visualizing and Understanding Convolutional Networks", section 4.2,
    with the window slid as Captum's ``Occlusion`` slides it. A window of ``window`` = (c, h, w)
    elements starts at every multiple of ``stride`` along each axis, up to the first start whose
    window reaches the image's end (a last window that overhangs is cut at the edge). With
    :math:`x^{(w)}` the input whose window w is set to the baseline b and S the objective of the
    target class, each element's attribution is the mean over the windows that cover it:

    .. math::
        x^{(w)} = x \odot (1 - m_w) + b \odot m_w, \qquad
        R_{cij} = \frac{\sum_{w \ni (c,i,j)} \big(S(x) - S(x^{(w)})\big)}{\big|\{w \ni (c,i,j)\}\big|}

    with :math:`m_w` the window's 0/1 mask. Forward passes only (one per window and image, no
    gradient), so it runs on any model the backend runs. ``channel_reduce=None, normalize=False``
    gives Captum's raw (N,C,H,W) attribution; by default the channels are averaged and each map
    scaled to [0, 1].

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class on the clean input; an int or one int
            per image; ``"argmax_per_sample"`` (every occluded copy picks its own top class); or
            ``ms.region(...)``.
        window: the occluding window (channels, height, width), integers >= 1 no larger than the
            image (default (3, 16, 16)).
        stride: the window's step along each axis (default (3, 8, 8)); no larger than the window
            where the window is smaller than the image, so every element is covered.
        baseline: what the window is set to, in model space: a number (default 0.0) or an array
            broadcast to x's shape.
        objective: the scalar S compared (``"logit"`` by default; see multisal.objectives).
        channel_reduce: ``"mean"`` (default), ``"max"`` or None (keep the channels).
        normalize: scale each map to [0, 1] by its minimum and maximum (default True; False keeps
            the attribution in the objective's units).
        batch_size: occluded inputs per backend call (default None: as many as the backend's
            memory budget holds for this input shape).
        progress: show a progress bar (default False).

    Returns:
        float32 (N,H,W) maps in [0, 1]; (N,C,H,W) with ``channel_reduce=None``; signed, in the
        objective's units, with ``normalize=False``.

    Example:
        >>> raw = ms.occlusion(be, x, target=0, channel_reduce=None, normalize=False)
        >>> raw.shape, ms.occlusion(be, x).shape
        ((2, 3, 32, 32), (2, 32, 32))
    """
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    x = check_input(x)
    windows = window_slices(x.shape[1:], window, stride)
    base = check_baseline(baseline, x)
    clean = be.run(x).outputs
    target = clean_pass_target(target, clean)
    clean_score = objective_from_scores(clean, objective, target)
    n_windows = len(windows)

    def make(start, stop):
        rows = np.arange(start, stop)
        images = rows // n_windows
        occluded = x[images]
        for row, (i, w) in enumerate(zip(images, rows % n_windows)):
            occluded[row][windows[w]] = base[i][windows[w]]
        return images, occluded, None

    total = np.zeros(x.shape, np.float64)
    for start, stop, scores in perturbed_scores(be, len(x) * n_windows, make, objective, target,
                                                samples_per_call(be, batch_size, x.shape[1:]), progress, "occlusion"):
        for row, score in zip(range(start, stop), scores):
            i, w = divmod(row, n_windows)
            total[i][windows[w]] += clean_score[i] - score
    counts = np.zeros(x.shape[1:], np.float64)
    for w in windows:
        counts[w] += 1
    attribution = (total / counts).astype(np.float32)
    maps = reduce_channels(attribution, channel_reduce, abs=False)
    return scale_01(maps) if normalize else maps


def window_slices(shape, window, stride):
    """The windows of Captum's Occlusion over an image of `shape` (C,H,W), as tuples of slices:
    along each axis a window starts at every multiple of the stride until one reaches the end."""
    window = _three("window", window)
    stride = _three("stride", stride)
    if any(w > d for w, d in zip(window, shape)):
        raise MultisalError(f"window {window} is larger than the image {tuple(shape)} (channels, height, width)")
    if any(s > w and w < d for s, w, d in zip(stride, window, shape)):
        raise MultisalError(f"stride {stride} is larger than the window {window}: the windows would leave "
                            "elements between them uncovered")
    starts = [range(0, d - w + s, s) for w, s, d in zip(window, stride, shape)]
    count = int(np.prod([len(r) for r in starts]))
    if count > MAX_WINDOWS:
        raise MultisalError(f"window {window} with stride {stride} gives {count} windows per image, over the "
                            f"limit of {MAX_WINDOWS}")
    return [tuple(slice(a, a + w) for a, w in zip(corner, window)) for corner in itertools.product(*starts)]


def _three(name, value):
    try:
        values = tuple(v.__index__() for v in value)   # integers only: 16.5 is no size
    except (TypeError, AttributeError):
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise MultisalError(f"{name}={value!r}: expected 3 integers >= 1 (channels, height, width)")
    return values

