"""SmoothGrad (Smilkov et al. 2017): the mean over noisy copies of the input of each copy's map.

The map of every noisy sample is formed first (|g| or g**2, then the channel reduction), and the
mean over samples is taken last, as the Chainer write-up does (mean of per-sample channel maxima,
which is not the channel maximum of the mean gradient). The averaging is multisal.noise's driver,
so n="auto" and the noise streams are those of every smoothed method.
"""
import numpy as np

from ..maps import check_channel_reduce
from ..noise import DEFAULT_NOISE_LEVEL, average_over_noise
from ..objectives import check_objective, clean_target
from .vanilla import gradient_map


def smoothgrad(be, x, target=None, objective="logit", n=50, noise_level=DEFAULT_NOISE_LEVEL, sigma=None,
               noise="normal", seed=0, channel_reduce="max", abs=True, square=False,
               batch_size=None, progress=False, preset=None, tol=0.05, max_n=200, stats=None):
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    target = clean_target(be, x, target)

    def per_sample(noisy, images):
        chunk_target = target[images] if isinstance(target, np.ndarray) else target
        return gradient_map(be, noisy, chunk_target, objective, channel_reduce, abs, square)

    mean = average_over_noise(per_sample, be, x, n=n, noise_level=noise_level, sigma=sigma, noise=noise, seed=seed,
                              batch_size=batch_size, progress=progress, preset=preset, desc="smoothgrad",
                              tol=tol, max_n=max_n, stats=stats)
    return mean.astype(np.float32)
