"""What the metrics share: the checks of their inputs, the rank correlation and the area under a
curve, and the order in which a map ranks its pixels."""
from __future__ import annotations

import numpy as np

from ..errors import MultisalError


def check_maps(name, maps, x) -> np.ndarray:
    """Map `name` as float64 (N, H, W) for inputs x (N, C, H, W): one map per input, at the
    input's resolution, finite. An attribution per channel, (N, C, H, W) as Integrated Gradients
    and Occlusion with channel_reduce=None give, becomes the max over channels of its magnitude
    (the vanilla gradient's default reduction); (N, 1, H, W) is taken as (N, H, W)."""
    if not isinstance(maps, np.ndarray) or maps.dtype.kind not in "fiu":
        raise MultisalError(f"map {name!r} must be a numeric numpy array, got "
                            f"{getattr(maps, 'dtype', type(maps).__name__)}")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    elif maps.ndim == 4 and maps.shape[1] == x.shape[1]:
        maps = np.abs(maps).max(axis=1)
    expected = (len(x), *x.shape[2:])
    if maps.shape != expected:
        raise MultisalError(f"map {name!r} has shape {maps.shape}, expected {expected} (one map per input, at the "
                            f"inputs' height and width {tuple(x.shape[2:])})")
    if not np.isfinite(maps).all():
        raise MultisalError(f"map {name!r} holds NaN or infinite values")
    return maps.astype(np.float64)


def saliency_order(maps) -> np.ndarray:
    """(N, H*W) pixel indices of each map from the most salient to the least: the reverse of a
    stable ascending sort, as the RISE paper's released code orders them (np.flip of np.argsort),
    so pixels of equal saliency come in descending index order."""
    flat = np.asarray(maps).reshape(len(maps), -1)
    return np.flip(np.argsort(flat, axis=1, kind="stable"), axis=1)


def normalized_auc(curves) -> np.ndarray:
    """The trapezoidal area under each curve (rows of (N, K) values at K evenly spaced points of
    [0, 1]): (sum - first / 2 - last / 2) / (K - 1)."""
    curves = np.asarray(curves, np.float64)
    return (curves.sum(axis=1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (curves.shape[1] - 1)


def ranks(values) -> np.ndarray:
    """Ranks 1..n of each row of (N, n), ties given their mean rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, np.float64)
    out = np.empty_like(values)
    for row, v in zip(out, values):
        order = np.argsort(v, kind="stable")
        sorted_v = v[order]
        starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
        stops = np.r_[starts[1:], len(v)]
        mean_rank = (starts + stops + 1) / 2.0          # ranks start+1..stop averaged
        row[order] = np.repeat(mean_rank, stops - starts)
    return out


def spearman(a, b) -> np.ndarray:
    """Spearman's rank correlation of each pair of rows of a and b (N, ...): Pearson's of their
    ranks; 0 where either row is constant (its ranks carry no order)."""
    ra, rb = ranks(np.reshape(a, (len(a), -1))), ranks(np.reshape(b, (len(b), -1)))
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    return np.where(norm > 0, (ra * rb).sum(axis=1) / np.where(norm > 0, norm, 1), 0.0)


def check_count(name, value, lo, hi=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value > hi):
        raise MultisalError(f"{name}={value!r}: expected an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
    return int(value)
