"""SmoothGrad (Smilkov et al. 2017): the mean over noisy copies of the input of each copy's map.

The map of every noisy sample is formed first (|g| or g**2, then the channel reduction), and the
mean over samples is taken last, as the Chainer write-up does (mean of per-sample channel maxima,
which is not the channel maximum of the mean gradient).

n="auto" keeps sampling, AUTO_STEP samples per image at a time, until the image's running mean map,
scaled by its maximum, moved by less than `tol` (relative L2) over the last AUTO_STEP samples, or
until `max_n` samples; `stats["samples"]` then holds the number each image used.
"""
import numpy as np

from ..errors import MultisalError
from ..maps import add_per_image, check_channel_reduce, reduce_channels
from ..noise import DEFAULT_NOISE_LEVEL, NoiseStream, make_rng, noisy_copies, resolve_sigma, value_range_of
from ..objectives import check_objective, clean_target


def smoothgrad(be, x, target=None, objective="logit", n=50, noise_level=DEFAULT_NOISE_LEVEL, sigma=None,
               noise="normal", seed=0, channel_reduce="max", abs=True, square=False,
               batch_size=None, progress=False, preset=None, tol=0.05, max_n=200, stats=None):
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    x = np.asarray(x, dtype=np.float32)
    if isinstance(noise, str):
        sigma = resolve_sigma(noise_level, sigma, value_range_of(be, preset), x)
    elif sigma is not None:
        raise MultisalError("an explicit noise array is added as it is: do not give sigma with it")
    target = clean_target(be, x, target)
    step = int(batch_size) if batch_size else be.batch_size(x.shape[1:])

    def maps_of(noisy, images):
        chunk_target = target[images] if isinstance(target, np.ndarray) else target
        grad = be.run(noisy, objective, chunk_target, input_grad=True).input_grad
        return reduce_channels(grad, channel_reduce, abs=abs, square=square)

    if isinstance(n, str):
        if n != "auto" or not isinstance(noise, str):
            raise MultisalError(f"n={n!r}: expected a number of samples, or 'auto' with noise 'normal' or 'legacy'")
        rngs = [make_rng(noise, seed) for _ in range(len(x))]   # one stream per image, as NoiseStream
        return _until_stable(x, maps_of, rngs, noise, sigma or 0.0, step, tol, max_n, stats, progress)
    stream = NoiseStream(noise, x, n, sigma or 0.0, seed)
    sums = None
    for images, noisy in stream.batches(step, progress, desc="smoothgrad"):
        maps = maps_of(noisy, images)
        if sums is None:
            sums = np.zeros((len(x), *maps.shape[1:]))
        add_per_image(sums, images, maps)
    if stats is not None:
        stats["samples"] = np.full(len(x), stream.n)
    return (sums / stream.n).astype(np.float32)


AUTO_STEP = 10


def _until_stable(x, maps_of, rngs, kind, sigma, step, tol, max_n, stats, progress):
    """Sample AUTO_STEP more per still-moving image, round by round, until every running mean has
    settled or reached max_n samples. Each image draws from its own stream rngs[i], so it stops
    where it would alone."""
    from tqdm.auto import tqdm

    sums, counts = None, np.zeros(len(x), dtype=np.int64)
    previous = [None] * len(x)
    active = np.arange(len(x))
    bar = tqdm(total=int(max_n), desc="smoothgrad auto", disable=not progress, unit="sample")
    while len(active):
        images = np.repeat(active, AUTO_STEP)
        for start in range(0, len(images), step):
            idx = images[start:start + step]
            maps = maps_of(noisy_copies(rngs, kind, x, idx, sigma), idx)
            if sums is None:
                sums = np.zeros((len(x), *maps.shape[1:]))
            add_per_image(sums, idx, maps)
        counts[active] += AUTO_STEP
        bar.update(AUTO_STEP)
        still = []
        for i in active:
            mean = sums[i] / counts[i]
            scaled = mean / max(float(np.abs(mean).max()), 1e-30)
            settled = previous[i] is not None and \
                np.linalg.norm(scaled - previous[i]) <= tol * np.linalg.norm(scaled)
            previous[i] = scaled
            if not settled and counts[i] < max_n:
                still.append(i)
        active = np.array(still, dtype=np.int64)
    bar.close()
    if stats is not None:
        stats["samples"] = counts
    return (sums / counts.reshape(-1, *[1] * (sums.ndim - 1))).astype(np.float32)
