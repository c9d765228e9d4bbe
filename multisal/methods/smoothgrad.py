"""SmoothGrad (Smilkov et al. 2017): the mean over noisy copies of the input of each copy's map.

The map of every noisy sample is formed first (|g| or g**2, then the channel reduction), and the
mean over samples is taken last, as the Chainer write-up does (mean of per-sample channel maxima,
which is not the channel maximum of the mean gradient).
"""
import numpy as np

from ..errors import MultisalError
from ..maps import add_per_image, check_channel_reduce, reduce_channels
from ..noise import DEFAULT_NOISE_LEVEL, NoiseStream, resolve_sigma, value_range_of
from ..objectives import check_objective, clean_target


def smoothgrad(be, x, target=None, objective="logit", n=50, noise_level=DEFAULT_NOISE_LEVEL, sigma=None,
               noise="normal", seed=0, channel_reduce="max", abs=True, square=False,
               batch_size=None, progress=False, preset=None):
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    x = np.asarray(x, dtype=np.float32)
    if isinstance(noise, str):
        sigma = resolve_sigma(noise_level, sigma, value_range_of(be, preset), x)
    elif sigma is not None:
        raise MultisalError("an explicit noise array is added as it is: do not give sigma with it")
    stream = NoiseStream(noise, x, n, sigma or 0.0, seed)
    target = clean_target(be, x, target)
    step = int(batch_size) if batch_size else be.batch_size(x.shape[1:])
    sums = None
    for images, noisy in stream.batches(step, progress, desc="smoothgrad"):
        chunk_target = target[images] if isinstance(target, np.ndarray) else target
        grad = be.run(noisy, objective, chunk_target, input_grad=True).input_grad
        maps = reduce_channels(grad, channel_reduce, abs=abs, square=square)
        if sums is None:
            sums = np.zeros((len(x), *maps.shape[1:]))
        add_per_image(sums, images, maps)
    return (sums / stream.n).astype(np.float32)
