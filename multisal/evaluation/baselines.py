"""Trivial maps scored by the same metrics, so that a method's scores can be read against what no
explanation at all reaches: a random map (independent uniform pixels, from the seed) and an edge
detector (the Sobel gradient magnitude of the input's channel mean), which ignores the model."""
from __future__ import annotations

import numpy as np

from ..backend import check_input

SOBEL = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def random_map(be, x, target=None, seed=0) -> np.ndarray:
    """float32 (N, H, W) maps of independent uniform values in [0, 1) drawn from the seed (the
    backend and target are taken, and ignored, so it is explained like a method)."""
    x = check_input(x)
    return np.random.default_rng(seed).random((len(x), *x.shape[2:])).astype(np.float32)


def sobel_map(be, x, target=None) -> np.ndarray:
    r"""float32 (N, H, W): :math:`\sqrt{(S_x * g)^2 + (S_y * g)^2}` of the channel mean g of each input,
    S the 3 x 3 Sobel kernels, the image's edge pixels repeated beyond it (backend and target ignored)."""
    x = check_input(x)
    gray = np.pad(x.astype(np.float64).mean(axis=1), ((0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = x.shape[2:]

    def correlate(kernel):
        return sum(kernel[a, b] * gray[:, a:a + height, b:b + width] for a in range(3) for b in range(3))

    return np.sqrt(correlate(SOBEL) ** 2 + correlate(SOBEL.T) ** 2).astype(np.float32)


BASELINES = {"random": random_map, "sobel": sobel_map}
