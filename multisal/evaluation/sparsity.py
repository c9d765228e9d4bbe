r"""How concentrated a map is, from its magnitudes alone (no model): sparseness, the Gini index
of Chalasani et al. 2020 (Quantus's Sparseness; high: a few pixels hold the mass), and
complexity, the entropy of Bhatt et al. 2020 (Quantus's Complexity; low: a few pixels hold it).
With :math:`a_{(1)} \le \dots \le a_{(n)}` the sorted magnitudes |m| of a map of n pixels and
:math:`p_i = |m_i| / \sum_j |m_j|`:

.. math::
    G = \frac{\sum_{k=1}^{n} (2k - n - 1)\, a_{(k)}}{n \sum_{k} a_{(k)}}, \qquad
    H = -\sum_{i=1}^{n} p_i \log p_i

A map that is 0 everywhere has G = 0 and H = log n (no pixel stands out).
"""
from __future__ import annotations

import numpy as np


def sparseness(maps) -> np.ndarray:
    """The Gini index of each map's magnitudes (N, H, W) -> float64 (N,)."""
    a = np.sort(np.abs(np.asarray(maps, np.float64)).reshape(len(maps), -1), axis=1)
    n = a.shape[1]
    k = np.arange(1, n + 1)
    total = a.sum(axis=1)
    return np.where(total > 0, ((2 * k - n - 1) * a).sum(axis=1) / (n * np.where(total > 0, total, 1)), 0.0)


def complexity(maps) -> np.ndarray:
    """The entropy of each map's normalised magnitudes (N, H, W) -> float64 (N,)."""
    a = np.abs(np.asarray(maps, np.float64)).reshape(len(maps), -1)
    total = a.sum(axis=1, keepdims=True)
    p = np.where(total > 0, a / np.where(total > 0, total, 1), 1.0 / a.shape[1])
    return -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
