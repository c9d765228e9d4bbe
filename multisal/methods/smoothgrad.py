"""SmoothGrad (Smilkov et al. 2017): the mean over noisy copies of the input of each copy's map.

The map of every noisy sample is formed first (|g| or g**2, then the channel reduction), and the
mean over samples is taken last, as the Chainer write-up does (mean of per-sample channel maxima,
which is not the channel maximum of the mean gradient). The averaging is multisal.noise's driver,
so n="auto" and the noise streams are those of every smoothed method.
"""
import numpy as np

from ..maps import check_channel_reduce
from ..noise import DEFAULT_NOISE_LEVEL, average_over_noise
from ..objectives import check_objective, clean_target, target_rows
from .vanilla import gradient_map


def smoothgrad(be, x, target=None, objective="logit", n=50, noise_level=DEFAULT_NOISE_LEVEL, sigma=None,
               noise="normal", seed=0, channel_reduce="max", abs=True, square=False,
               batch_size=None, progress=False, preset=None, tol=0.05, max_n=200, stats=None):
    r"""SmoothGrad (Smilkov et al. 2017): the vanilla gradient's map averaged over noisy copies of the input.

    Smilkov, Thorat, Kim, Viégas and Wattenberg 2017, "SmoothGrad: removing noise by adding noise".
    Each noisy copy's map is formed first and the mean over copies is taken last (the mean of
    per-copy channel maxima, not the channel maximum of the mean gradient):

    .. math::
        M(x) = \frac{1}{n} \sum_{t=1}^{n} R\left(\frac{\partial S}{\partial x}(x + \varepsilon_t)\right),
        \qquad \varepsilon_t \sim \mathcal{N}(0, \sigma^2 I),
        \qquad \sigma = \text{noise\_level} \cdot (\text{hi} - \text{lo})

    where :math:`R(g)_{ij} = \max_c |g_{cij}|` (``channel_reduce``, ``abs``; :math:`g_{cij}^2`
    with ``square=True``) and (lo, hi) is the preset's value range (``Preset.value_range``, the
    channel-averaged range of a clean input in model space). Every image draws its noise from its
    own stream seeded with ``seed``, so an image's map does not depend on the images beside it.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class on the clean input, kept for every
            noisy copy; an int or one int per image; ``"argmax_per_sample"`` to let every noisy
            copy pick its own top class (the Chainer write-up); or ``ms.region(...)``.
        objective: the scalar S differentiated (``"logit"`` by default; see multisal.objectives).
        n: noisy copies per image (default 50), or ``"auto"``: sample 10 at a time until the map
            settles (``tol``) or ``max_n`` copies are drawn.
        noise_level: sigma relative to the value range (default 0.15). The range is the preset's;
            with no preset (neither ``preset`` nor ``be.preset``) it is each image's own
            max - min, so an image's noise does not depend on the images beside it.
        sigma: the noise's standard deviation in model space instead (give sigma or noise_level,
            not both; default None).
        noise: ``"normal"`` (default: NumPy's PCG64 Generator, float32), ``"legacy"`` (the
            Chainer write-up's ``np.random.RandomState(seed).randn`` stream, float64), or the noise
            itself as an array (n,C,H,W) or (N,n,C,H,W), added as it is.
        seed: the seed of every image's noise stream (default 0).
        channel_reduce: ``"max"`` (default), ``"mean"`` or None (keep the channels).
        abs: average :math:`|g|` (default True); False averages signed gradients.
        square: average :math:`g^2` instead (default False; overrides ``abs``).
        batch_size: noisy copies per backend call (default None: as many as the backend's memory
            budget holds for this input shape).
        progress: show a progress bar (default False).
        preset: the preset whose value range ``noise_level`` refers to (default None: the
            backend's ``preset``).
        tol: with ``n="auto"``, stop once 10 more copies move the max-scaled mean by less than this
            relative L2 distance (default 0.05).
        max_n: with ``n="auto"``, the most copies an image draws (default 200).
        stats: a dict to receive ``stats["samples"]``, the copies each image used (default None).

    Returns:
        float32 (N,H,W) maps, >= 0 unless ``abs=False`` (not scaled); (N,C,H,W) with
        ``channel_reduce=None``.

    Example:
        >>> sg = ms.smoothgrad(be, x, n=10, noise_level=0.1)
        >>> sg.shape, bool(np.allclose(sg[1], ms.smoothgrad(be, x[1:], n=10, noise_level=0.1)[0]))
        ((2, 32, 32), True)
    """
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    target = clean_target(be, x, target)

    def per_sample(noisy, images):
        chunk_target = target_rows(target, images)
        return gradient_map(be, noisy, chunk_target, objective, channel_reduce, abs, square)

    mean = average_over_noise(per_sample, be, x, n=n, noise_level=noise_level, sigma=sigma, noise=noise, seed=seed,
                              batch_size=batch_size, progress=progress, preset=preset, desc="smoothgrad",
                              tol=tol, max_n=max_n, stats=stats)
    return mean.astype(np.float32)
