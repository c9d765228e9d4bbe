"""Integrated Gradients (Sundararajan et al. 2017): the gradient integrated along a path from a baseline.

attribution = (x - x') * sum_k w_k * grad(x' + a_k (x - x')). The paper approximates the path
integral by the right Riemann sum (a_k = k/m, w_k = 1/m), which is the default here; Captum's
default is Gauss-Legendre, offered under the same name as Captum's.
"""
import numpy as np

from ..backend import check_baseline, check_input, even_chunks, samples_per_call
from ..errors import MultisalError
from ..maps import add_per_image
from ..objectives import check_objective, clean_target, target_rows
from ..progress import progress_bar

METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")
# More path points than this is a typo (each costs a backward pass per image).
MAX_STEPS = 100_000


def _path(method, steps):
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    k = np.arange(steps)
    if method == "riemann_right":
        return (k + 1) / steps, np.full(steps, 1 / steps)
    if method == "riemann_left":
        return k / steps, np.full(steps, 1 / steps)
    if method == "riemann_middle":
        return (k + 0.5) / steps, np.full(steps, 1 / steps)
    if method == "riemann_trapezoid":
        if steps < 2:
            raise MultisalError("riemann_trapezoid needs steps >= 2")
        weights = np.full(steps, 1 / (steps - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, steps), weights
    raise MultisalError(f"unknown integration method {method!r}: expected one of {', '.join(METHODS)}")


def integrated_gradients(be, x, target=None, baseline=None, steps=50, objective="logit",
                         method="riemann_right", batch_size=None, progress=False):
    r"""Integrated Gradients (Sundararajan et al. 2017): (x - x') times the mean gradient on the path from x'.

    Sundararajan, Taly and Yan 2017, "Axiomatic Attribution for Deep Networks". The attribution of
    input element i is the path integral of the gradient from the baseline x' to x, approximated
    by default by the paper's right Riemann sum with m = ``steps`` points:

    .. math::
        \mathrm{IG}_i(x) = (x_i - x'_i) \int_0^1 \frac{\partial S}{\partial x_i}\big(x' + \alpha (x - x')\big)\, d\alpha
        \approx (x_i - x'_i) \sum_{k=1}^{m} \frac{1}{m}\,
        \frac{\partial S}{\partial x_i}\Big(x' + \frac{k}{m} (x - x')\Big)

    The attributions of an image sum to about :math:`S(x) - S(x')` (completeness). Other rules
    replace the points :math:`\alpha_k = k/m` and weights :math:`1/m`: ``"riemann_left"``
    (:math:`(k-1)/m`), ``"riemann_middle"`` (:math:`(k-1/2)/m`), ``"riemann_trapezoid"`` (m evenly
    spaced points from 0 to 1, the end ones at half weight) and ``"gausslegendre"`` (Captum's
    default: Gauss-Legendre nodes and weights mapped to [0, 1]).

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class on the clean input, kept along the
            whole path; an int or one int per image; ``"argmax_per_sample"`` (each path point
            picks its own top class); or ``ms.region(...)``.
        baseline: x', None (default) for zeros in model space (as Captum), or a scalar or an
            array broadcast to x's shape.
        steps: the number m of path points per image (default 50, at least 1; 2 for the
            trapezoid rule).
        objective: the scalar S differentiated (``"logit"`` by default; see multisal.objectives).
        method: the quadrature rule, one of ``"riemann_right"`` (default, the paper's),
            ``"riemann_left"``, ``"riemann_middle"``, ``"riemann_trapezoid"``, ``"gausslegendre"``.
        batch_size: path points per backend call (default None: as many as the backend's memory
            budget holds for this input shape).
        progress: show a progress bar (default False).

    Returns:
        float32 (N,C,H,W) signed attributions, in the objective's units (not scaled).

    Example:
        >>> ig = ms.integrated_gradients(be, x, target=0, steps=50)
        >>> gap = be.predict(x)[:, 0] - be.predict(np.zeros_like(x))[:, 0]
        >>> ig.shape, bool(np.allclose(ig.sum(axis=(1, 2, 3)), gap, rtol=0.1))
        ((2, 3, 32, 32), True)
    """
    check_objective(objective)
    x = check_input(x)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise MultisalError(f"steps={steps!r} must be an integer 1..{MAX_STEPS}")
    alphas, weights = _path(method, int(steps))
    base = check_baseline(baseline, x)
    target = clean_target(be, x, target)
    delta = x - base
    total = np.zeros(x.shape, dtype=np.float64)
    # One batch holds whole images' worth of path points: image i's points are rows i*steps..(i+1)*steps-1.
    flat_alpha = np.tile(alphas, len(x))
    flat_weight = np.tile(weights, len(x))
    images = np.repeat(np.arange(len(x)), len(alphas))
    step = samples_per_call(be, batch_size, x.shape[1:])
    for start, stop in progress_bar(even_chunks(len(images), step), desc="integrated_gradients", enabled=progress,
                                    unit="batch"):
        sl = slice(start, stop)
        idx = images[sl]
        a = flat_alpha[sl].astype(np.float32)[:, None, None, None]
        points = base[idx] + a * delta[idx]
        chunk_target = target_rows(target, idx)
        grad = be.run(points, objective, chunk_target, input_grad=True).input_grad
        add_per_image(total, idx, grad * flat_weight[sl][:, None, None, None])
    return (delta * total).astype(np.float32)
