r"""Deletion and insertion (Petsiuk et al. 2018, the RISE paper, section 4.1, and its released
evaluation code): the target's probability as the pixels a map ranks first are removed from the
image, or inserted into a blurred copy of it, a fixed number of pixels per step.

With :math:`x^{(k)}` the input after the first k steps of s pixels each (in order of decreasing
saliency; every channel of a pixel at once), p the softmax probability of the target class and
K = ceil(H W / s) steps, the curve is :math:`p(x^{(0)}), \dots, p(x^{(K)})` and the score its
normalised trapezoidal area

.. math::
    \mathrm{AUC} = \frac{1}{K}\Big(\sum_{k=0}^{K} p(x^{(k)}) - \frac{p(x^{(0)}) + p(x^{(K)})}{2}\Big)

Deletion starts from the image and sets the pixels to the preset's zero (0 in model space: the
preset's mean colour); a good map makes the probability fall fast (low is good). Insertion starts
from the image blurred with a Gaussian (kernel 11, sigma 5, zero padding, as the released code's
``gkern``) and puts the image's pixels back; a good map makes it rise fast (high is good).
Every perturbed input of every step and image goes through the backend's forward passes in
batches of its memory budget (forward-only: no gradient graph is built).
"""
from __future__ import annotations

import numpy as np

from ..backend import check_input, samples_per_call
from ..errors import MultisalError
from ..methods.perturb import all_perturbed_scores
from ..objectives import clean_target
from .common import check_count, check_maps, normalized_auc, saliency_order

BLUR_SIZE = 11
BLUR_SIGMA = 5.0
# The released code's steps at 224 x 224 (224 pixels a step): the default keeps 224 steps at any size.
DEFAULT_STEPS = 224
MODES = ("deletion", "insertion")


def blur_kernel(size=BLUR_SIZE, sigma=BLUR_SIGMA) -> np.ndarray:
    """The 1-D factor of the released code's blur kernel: scipy.ndimage.gaussian_filter (radius
    4 sigma, mode "reflect") of a delta in the middle of `size` samples. At sigma 5 the Gaussian is
    wider than the kernel, so what reaches past an end is folded back: the kernel is not the
    sampled Gaussian."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    period = 2 * size
    kernel = np.zeros(size)
    for i in range(size):
        j = np.mod(i + offsets, period)
        j = np.where(j >= size, period - 1 - j, j)     # half-sample reflection, d c b a | a b c d
        kernel[i] = weights[j == size // 2].sum()
    return kernel


def gaussian_blur(x, size=BLUR_SIZE, sigma=BLUR_SIGMA) -> np.ndarray:
    """Each channel of x (N, C, H, W) correlated with the released code's 2-D kernel (the outer
    product of blur_kernel with itself), zero padding of size // 2: its conv2d with padding klen // 2."""
    kernel = blur_kernel(size, sigma)
    pad = size // 2
    out = np.asarray(x, np.float64)
    for axis in (2, 3):
        widths = [(0, 0)] * 4
        widths[axis] = (pad, pad)
        padded = np.pad(out, widths)
        length = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(k, k + length), axis=axis) for k, w in enumerate(kernel))
    return out.astype(np.float32)


def causal_curves(be, x, maps, mode, target=None, step=None, batch_size=None, progress=False, name="map"):
    """The deletion or insertion curves of maps (N, H, W) on inputs x: float64 (N, K + 1), the
    target's softmax probability before any step and after each (see the module docstring).

    target: None (each image's top class on the clean input), an int or one int per image.
    step: pixels per step (default None: ceil(H W / 224), the released code's 224 at 224 x 224).
    """
    if mode not in MODES:
        raise MultisalError(f"unknown mode {mode!r}: expected 'deletion' or 'insertion'")
    x = check_input(x)
    maps = check_maps(name, maps, x)
    n_images, _, height, width = x.shape
    pixels = height * width
    step = -(-pixels // DEFAULT_STEPS) if step is None else check_count("step", step, 1, pixels)
    n_steps = -(-pixels // step)
    target = clean_target(be, x, target)
    rank = np.empty((n_images, pixels), np.int64)
    np.put_along_axis(rank, saliency_order(maps), np.arange(pixels)[None], axis=1)
    if mode == "deletion":
        start, finish = x, np.zeros_like(x)
    else:
        start, finish = gaussian_blur(x), x
    points = n_steps + 1

    def make(first, last):
        rows = np.arange(first, last)
        images, k = rows // points, rows % points
        changed = (rank[images] < (k * step)[:, None]).reshape(len(rows), 1, height, width)
        return images, np.where(changed, finish[images], start[images]), None

    scores = all_perturbed_scores(be, n_images * points, make, "softmax", target,
                                  samples_per_call(be, batch_size, x.shape[1:]), progress, mode)
    return scores.reshape(n_images, points)


def deletion(be, x, maps, target=None, step=None, batch_size=None, progress=False, name="map"):
    """The deletion score of each map: the normalised area under its deletion curve (low is good)."""
    return normalized_auc(causal_curves(be, x, maps, "deletion", target, step, batch_size, progress, name))


def insertion(be, x, maps, target=None, step=None, batch_size=None, progress=False, name="map"):
    """The insertion score of each map: the normalised area under its insertion curve (high is good)."""
    return normalized_auc(causal_curves(be, x, maps, "insertion", target, step, batch_size, progress, name))
