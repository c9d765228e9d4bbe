r"""ROAD, RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods"): the target's probability after the pixels a map ranks highest (MoRF, most
relevant first) or lowest (LeRF, least relevant first) are removed, at given percentages, and
filled in by noisy linear imputation, so that the filled-in pixels do not give away where they were.

Noisy linear imputation (the authors' released imputer, which pytorch-grad-cam's ROAD copies):
each removed pixel is the weighted mean of its 8 neighbours inside the image, weights 1/6 for
the 4 edge neighbours and 1/12 for the 4 corner ones, solved as one sparse linear system for all
removed pixels of a channel at once, then Gaussian noise of standard deviation `noise` (0.01,
in model space) is added to each:

.. math::
    \Big(\sum_{q \in N(p)} w_q\Big)\, v_p - \sum_{q \in N(p),\, q\ \mathrm{removed}} w_q\, v_q
    = \sum_{q \in N(p),\, q\ \mathrm{kept}} w_q\, x_q, \qquad \tilde x_p = v_p + \epsilon_p,\
    \epsilon_p \sim \mathcal{N}(0, \sigma^2)

At p percent of n pixels, MoRF removes the k = n - ceil((1 - p / 100)(n - 1)) pixels the map ranks
first and LeRF the k it ranks last (common.saliency_order): on a map without ties exactly the
pixels at or above numpy.percentile(map, 100 - p) (MoRF) or at or below numpy.percentile(map, p)
(LeRF), as pytorch-grad-cam picks them, and p percent of them on a map with ties too (a
constant map included), where a threshold would take all the tied pixels or none. A good map
makes the MoRF probabilities low and the LeRF ones high. Each image's imputations are independent draws from the seed.
"""
from __future__ import annotations

import numpy as np

from ..backend import check_input, samples_per_call
from ..errors import MultisalError
from ..frameworks import lazy_import
from ..methods.perturb import all_perturbed_scores
from ..objectives import clean_target
from .common import check_maps, saliency_order

sparse = lazy_import("scipy.sparse")
sparse_linalg = lazy_import("scipy.sparse.linalg")

# (row offset, column offset): weight, as the released imputer weighs the neighbours.
NEIGHBOUR_WEIGHTS = {(1, 1): 1 / 12, (0, 1): 1 / 6, (-1, 1): 1 / 12, (1, -1): 1 / 12, (0, -1): 1 / 6,
                     (-1, -1): 1 / 12, (1, 0): 1 / 6, (-1, 0): 1 / 6}
DEFAULT_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ORDERS = ("morf", "lerf")
DEFAULT_NOISE = 0.01


def linear_imputation(image, removed) -> np.ndarray:
    """image (C, H, W) with the pixels where `removed` (H, W) is True replaced by the solution of
    the imputation system (see the module docstring), float64; no noise."""
    channels, height, width = image.shape
    flat_removed = np.asarray(removed, bool).reshape(-1)
    unknown = np.flatnonzero(flat_removed)
    out = np.asarray(image, np.float64).reshape(channels, -1).copy()
    if not len(unknown):
        return out.reshape(image.shape)
    if len(unknown) == flat_removed.size:
        raise MultisalError("ROAD cannot impute an image with every pixel removed: give percentages below 100")
    variable = np.full(flat_removed.size, -1, np.int64)
    variable[unknown] = np.arange(len(unknown))
    row0, col0 = np.divmod(unknown, width)
    diagonal = np.zeros(len(unknown))
    rhs = np.zeros((len(unknown), channels))
    rows, cols, values = [], [], []
    for (dr, dc), weight in NEIGHBOUR_WEIGHTS.items():
        r, c = row0 + dr, col0 + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        diagonal[inside] += weight
        eq = np.flatnonzero(inside)
        neighbour = (r * width + c)[inside]
        is_unknown = flat_removed[neighbour]
        rows.append(eq[is_unknown])
        cols.append(variable[neighbour[is_unknown]])
        values.append(np.full(int(is_unknown.sum()), -weight))
        np.add.at(rhs, eq[~is_unknown], weight * out[:, neighbour[~is_unknown]].T)
    n = len(unknown)
    matrix = sparse.csc_matrix((np.concatenate(values + [diagonal]),
                                (np.concatenate(rows + [np.arange(n)]), np.concatenate(cols + [np.arange(n)]))),
                               shape=(n, n))
    solution = sparse_linalg.spsolve(matrix, rhs)
    out[:, unknown] = np.asarray(solution).reshape(n, channels).T
    return out.reshape(image.shape)


def removed_pixels(saliency, percentage, order) -> np.ndarray:
    """(H, W) bool: the pixels ROAD removes from a map at `percentage` in `order` ("morf", "lerf")."""
    n = saliency.size
    # numpy.percentile's position of the (100 - p)-th percentile; the small margin keeps a
    # position that is an integer in exact arithmetic (0.8 x 50175) from rounding up past it.
    position = (1 - percentage / 100) * (n - 1)
    count = n - int(np.ceil(position - 1e-9))
    ranked = saliency_order(np.asarray(saliency)[None])[0]
    removed = np.zeros(n, bool)
    removed[ranked[:count] if order == "morf" else ranked[n - count:]] = True
    return removed.reshape(saliency.shape)


def road_input(image, saliency, percentage, order, noise, rng) -> np.ndarray:
    """The input ROAD gives the model for one image (C, H, W) and its map (H, W): the removed
    pixels imputed, then noise * rng.standard_normal((C, pixels removed)) added to them."""
    removed = removed_pixels(saliency, percentage, order)
    filled = linear_imputation(image, removed)
    filled[:, removed] += noise * rng.standard_normal((image.shape[0], int(removed.sum())))
    return filled


def check_percentages(percentages) -> tuple:
    try:
        values = tuple(float(p) for p in percentages)
    except (TypeError, ValueError):
        values = ()
    if not values or any(not 0 < p < 100 for p in values):
        raise MultisalError(f"percentages={percentages!r}: expected numbers strictly between 0 and 100")
    return values


def road_curves(be, x, maps, order, target=None, percentages=DEFAULT_PERCENTAGES, noise=DEFAULT_NOISE, seed=0,
                batch_size=None, progress=False, name="map"):
    """float64 (N, len(percentages)): the target's softmax probability on each input after ROAD's
    removal and noisy linear imputation at each percentage, in `order` "morf" or "lerf".

    target: None (each image's top class on the clean input), an int or one int per image.
    noise: the standard deviation of the imputation's noise, in model space (default 0.01).
    seed: the seed of the noise (image i, percentage k and the order draw from their own stream).
    """
    if order not in ORDERS:
        raise MultisalError(f"unknown ROAD order {order!r}: expected 'morf' or 'lerf'")
    x = check_input(x)
    maps = check_maps(name, maps, x)
    percentages = check_percentages(percentages)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < float("inf"):
        raise MultisalError(f"noise={noise!r}: expected a number >= 0")
    target = clean_target(be, x, target)
    count = len(percentages)

    def make(first, last):
        rows = np.arange(first, last)
        images = rows // count
        inputs = np.empty((len(rows), *x.shape[1:]), np.float32)
        for out, row in zip(inputs, rows):
            i, k = divmod(int(row), count)
            out[...] = road_input(x[i], maps[i], percentages[k], order, noise,
                                  np.random.default_rng([seed, i, k, ORDERS.index(order)]))
        return images, inputs, None

    scores = all_perturbed_scores(be, len(x) * count, make, "softmax", target,
                                  samples_per_call(be, batch_size, x.shape[1:]), progress, f"road {order}")
    return scores.reshape(len(x), count)


def road_score(be, x, maps, order, target=None, percentages=DEFAULT_PERCENTAGES, noise=DEFAULT_NOISE, seed=0,
         batch_size=None, progress=False, name="map"):
    """Each map's ROAD score in `order`: the mean over the percentages of road_curves."""
    return road_curves(be, x, maps, order, target, percentages, noise, seed, batch_size, progress, name).mean(axis=1)
