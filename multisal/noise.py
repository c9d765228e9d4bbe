"""Noise: the streams SmoothGrad-style methods draw from, and the one driver that averages any
per-sample quantity over noisy copies of the inputs (Captum's NoiseTunnel and PAIR's
GetSmoothedMask are the models).

    ms.smooth(ms.integrated_gradients, be, x, n=20, noise_level=0.1)   # SmoothGrad of IG
    ms.smooth(ms.gradcam, be, x, n=8)                                   # a smoothed Grad-CAM

smoothgrad (the vanilla gradient's map, averaged), smooth_gradcam_pp (the layer gradient's first
three moments, averaged) and the explain job's progression figure are this driver too.

Every image draws its samples from its own stream, seeded with `seed`, in sample order: an image's
noise depends neither on how its samples are chunked into batches nor on the other images beside it,
so ms.smoothgrad(be, x)[i] equals ms.smoothgrad(be, x[i:i+1])[0], and a batch job gives each image
the same map whichever images share its batch, on whichever engine or rerun.

- "normal": numpy Generator(PCG64(seed)), float32 draws, added in float32.
- "legacy": numpy.random.RandomState(seed).randn(1,C,H,W) per sample, float64, exactly what
  `np.random.seed(seed)` followed by the Chainer write-up's loop draws; the sum is formed in float64
  and cast to float32 as the write-up's `x += sigma * np.random.randn(...)` does.
- an explicit array of shape (n,C,H,W) (the same noise for every image) or (N,n,C,H,W): the noise
  itself, in model space, added as it is (sigma and noise_level are not used).

Sample counts: a fixed n; n="auto", which keeps sampling AUTO_STEP samples per image at a time
until the image's running mean, scaled by its maximum, moved by less than `tol` (relative L2)
over the last AUTO_STEP samples, or until `max_n`; or `checkpoints`, the running means after
each of several sample counts from one pass (the Chainer write-up's figure).
"""
from __future__ import annotations

import numpy as np

from .backend import even_chunks, samples_per_call
from .errors import MultisalError
from .maps import add_per_image
from .objectives import clean_target, target_rows
from .presets import get_preset
from .progress import progress_bar

AUTO_STEP = 10
# Upper bounds on sample counts: a typo of 10^6 would otherwise run for days.
MAX_SAMPLES = 100_000


class _DefaultNoiseLevel(float):
    """The default noise_level: a float that can be told apart from a value the caller passed."""


DEFAULT_NOISE_LEVEL = _DefaultNoiseLevel(0.15)


# ---- streams ---------------------------------------------------------------------------------------
class NoiseStream:
    def __init__(self, noise, x: np.ndarray, n: int, sigma, seed: int):
        self.x = x
        self.sigma = per_image_sigma(sigma, len(x))
        if isinstance(noise, str):
            self._rngs = [make_rng(noise, seed) for _ in range(len(x))]
            self.kind, self.n, self._array = noise, check_samples(n), None
        else:
            arr = np.asarray(noise)
            if arr.ndim == 4 and arr.shape[1:] == x.shape[1:]:
                arr = np.broadcast_to(arr, (len(x), *arr.shape))
            if arr.ndim != 5 or arr.shape[0] != len(x) or arr.shape[2:] != x.shape[1:]:
                raise MultisalError(f"noise array has shape {arr.shape}: expected (n,{','.join(map(str, x.shape[1:]))}) "
                                    f"or ({len(x)},n,{','.join(map(str, x.shape[1:]))})")
            self.kind, self.n, self._array = "array", check_samples(arr.shape[1]), arr

    def batches(self, step: int, progress=False, desc="samples"):
        """Yield (image index per sample, noisy inputs) in chunks of at most `step` samples."""
        for start, stop in progress_bar(even_chunks(len(self.x) * self.n, step), desc=desc, enabled=progress,
                                        unit="batch"):
            yield np.arange(start, stop) // self.n, self.take(start, stop)

    def take(self, start: int, stop: int) -> np.ndarray:
        """Noisy inputs for flat sample numbers start..stop-1 (image-major: image 0's samples, then
        image 1's, ...; asked for in order, as draws are sequential)."""
        images = np.arange(start, stop) // self.n
        if self.kind == "array":
            samples = np.arange(start, stop) % self.n
            return (self.x[images] + self._array[images, samples]).astype(np.float32)
        return noisy_copies(self._rngs, self.kind, self.x, images, self.sigma)


def check_samples(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise MultisalError(f"n={n!r}: the number of noisy samples must be an integer")
    if not 1 <= n <= MAX_SAMPLES:
        raise MultisalError(f"n={n}: the number of noisy samples must be 1..{MAX_SAMPLES}")
    return int(n)


def per_image_sigma(sigma, n_images) -> np.ndarray:
    """sigma (a number, or one per image) as one float per image."""
    return np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n_images,))


def noisy_copies(rngs, kind, x: np.ndarray, images: np.ndarray, sigma) -> np.ndarray:
    """x[images] + noise, each row's noise drawn from its image's own stream rngs[image] with its
    image's sigma[image]. Rows of one image must be contiguous and in sample order."""
    sigma = per_image_sigma(sigma, len(x))
    out = np.empty((len(images), *x.shape[1:]), np.float32)
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(images)]):
        i = images[lo]
        out[lo:hi] = add_noise(rngs[i], kind, np.broadcast_to(x[i], (hi - lo, *x.shape[1:])), float(sigma[i]))
    return out


def add_noise(rng, kind, base: np.ndarray, sigma: float) -> np.ndarray:
    """base + sigma * one draw per row of base, from a "normal" Generator or a "legacy" RandomState."""
    if kind == "normal":
        noisy = rng.standard_normal(base.shape, dtype=np.float32)
        noisy *= sigma
        noisy += base
        return noisy
    draws = np.concatenate([rng.randn(1, *base.shape[1:]) for _ in range(len(base))])
    return (base.astype(np.float64) + sigma * draws).astype(np.float32)


def make_rng(kind, seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 \
            or (kind == "legacy" and seed >= 2 ** 32):
        raise MultisalError(f"seed={seed!r}: expected an integer >= 0 (below 2**32 for noise 'legacy')")
    if kind == "normal":
        return np.random.Generator(np.random.PCG64(seed))
    if kind == "legacy":
        return np.random.RandomState(seed)
    raise MultisalError(f"unknown noise {kind!r}: expected 'normal', 'legacy' or an array (n,C,H,W)")


def resolve_sigma(noise_level, sigma, value_range, x: np.ndarray):
    """sigma is absolute (model space); noise_level is relative to the preset's value range.

    Without a preset the range is each image's own (its max - min), the SmoothGrad paper's choice:
    then sigma is one value per image, so an image's noise does not depend on the images beside it.
    """
    if sigma is not None:
        if noise_level is not DEFAULT_NOISE_LEVEL:
            raise MultisalError(f"give sigma or noise_level, not both (got sigma={sigma}, noise_level={noise_level})")
        if not _is_real(sigma) or not float(sigma) >= 0:
            raise MultisalError(f"sigma={sigma!r} must be a number >= 0")
        return float(sigma)
    if not _is_real(noise_level) or not float(noise_level) >= 0:
        raise MultisalError(f"noise_level={noise_level!r} must be a number >= 0")
    if value_range is not None:
        return float(noise_level) * (value_range[1] - value_range[0])
    flat = x.reshape(len(x), -1).astype(np.float64)
    return float(noise_level) * (flat.max(axis=1) - flat.min(axis=1))


def _is_real(value) -> bool:
    """A real number (NaN included, which the range checks then refuse); not a bool or a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def value_range_of(be, preset):
    """The value range noise_level refers to: the preset given, else the backend's, else None."""
    preset = preset if preset is not None else getattr(be, "preset", None)
    if preset is None:
        return None
    return get_preset(preset).value_range


# ---- the driver ------------------------------------------------------------------------------------
def average_over_noise(per_sample, be, x, n=50, noise_level=DEFAULT_NOISE_LEVEL, sigma=None, noise="normal",
                       seed=0, batch_size=None, progress=False, preset=None, desc="samples",
                       tol=0.05, max_n=200, checkpoints=None, stats=None):
    """The mean over noisy copies of x of per_sample(noisy, images): per_sample gets a batch of
    noisy inputs and the index of the image each came from, and returns one array (or a tuple of
    arrays) with a row per noisy input. Returns the mean per image in float64, shaped (N, ...) (a
    tuple of them for a tuple); with `checkpoints` (for one image), the running means after each count,
    stacked (len(checkpoints), ...). With n="auto" each image samples until its mean settles
    (the module docstring), and stats["samples"] tells how many each one used."""
    x = np.asarray(x, dtype=np.float32)
    if isinstance(noise, str):
        sigma = resolve_sigma(noise_level, sigma, value_range_of(be, preset), x)
    elif sigma is not None:
        raise MultisalError("an explicit noise array is added as it is: do not give sigma with it")
    step = samples_per_call(be, batch_size, x.shape[1:])
    if isinstance(n, str):
        if n != "auto" or not isinstance(noise, str):
            raise MultisalError(f"n={n!r}: expected a number of samples, or 'auto' with noise 'normal' or 'legacy'")
        return _until_stable(per_sample, x, noise, 0.0 if sigma is None else sigma, seed, step, tol, check_samples(max_n), stats,
                             progress, desc)
    if checkpoints is not None:
        n = max(checkpoints)
    if checkpoints is not None and len(x) != 1:
        raise MultisalError(f"checkpoints are running means of one image, got {len(x)} images")
    stream = NoiseStream(noise, x, n, 0.0 if sigma is None else sigma, seed)
    sums, done, running = None, 0, []
    for images, noisy in stream.batches(step, progress, desc=desc):
        values = per_sample(noisy, images)
        single = not isinstance(values, tuple)
        values = (values,) if single else values
        if sums is None:
            sums = [np.zeros((len(x), *v.shape[1:])) for v in values]
        if checkpoints is None:
            for total, v in zip(sums, values):
                add_per_image(total, images, v)
            continue
        for row in zip(*values):   # one image, its samples in order
            for total, r in zip(sums, row):
                total[0] += r
            done += 1
            if done in checkpoints:
                running.append([total[0] / done for total in sums])
    if stats is not None:
        stats["samples"] = np.full(len(x), stream.n)
    means = [np.stack(m) for m in zip(*running)] if checkpoints is not None else [s / stream.n for s in sums]
    return means[0] if single else tuple(means)


def _until_stable(per_sample, x, kind, sigma, seed, step, tol, max_n, stats, progress, desc):
    """Sample AUTO_STEP more per still-moving image, round by round, until every running mean has
    settled or reached max_n samples. Each image draws from its own stream, so it stops where it
    would alone."""
    rngs = [make_rng(kind, seed) for _ in range(len(x))]
    sums, counts = None, np.zeros(len(x), dtype=np.int64)
    previous = [None] * len(x)
    active = np.arange(len(x))
    bar = progress_bar(total=int(max_n), desc=f"{desc} auto", enabled=progress, unit="sample")
    while len(active):
        images = np.repeat(active, AUTO_STEP)
        for start in range(0, len(images), step):
            idx = images[start:start + step]
            maps = per_sample(noisy_copies(rngs, kind, x, idx, sigma), idx)
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
    return sums / counts.reshape(-1, *[1] * (sums.ndim - 1))


def smooth(method, be, x, n=50, noise_level=DEFAULT_NOISE_LEVEL, sigma=None, noise="normal", seed=0, target=None,
           batch_size=None, progress=False, preset=None, **method_kwargs):
    r"""SmoothGrad's averaging around any method (Smilkov et al. 2017): its maps' mean over noisy copies of x.

    Smilkov, Thorat, Kim, Viégas and Wattenberg 2017, "SmoothGrad: removing noise by adding
    noise", applied to any method M, as Captum's NoiseTunnel does: SmoothGrad of Integrated
    Gradients, a smoothed Grad-CAM, ...

    .. math::
        \hat M(x) = \frac{1}{n} \sum_{t=1}^{n} M(x + \varepsilon_t), \qquad
        \varepsilon_t \sim \mathcal{N}(0, \sigma^2 I), \qquad
        \sigma = \text{noise\_level} \cdot (\text{hi} - \text{lo})

    with (lo, hi) the preset's value range (``Preset.value_range``). The noise streams are
    ``ms.smoothgrad``'s, so ``ms.smooth(ms.vanilla_gradient, ...)`` is ``ms.smoothgrad(...)``.

    Args:
        method: a saliency method, called as ``method(be, noisy, target=..., **method_kwargs)`` on
            batches of noisy copies; it must return one map per input.
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        n: noisy copies per image (default 50), or ``"auto"`` (as for ``ms.smoothgrad``, with its
            default tol and max_n).
        noise_level: sigma relative to the preset's value range (default 0.15; with no preset,
            relative to each image's own max - min).
        sigma: the noise's standard deviation in model space instead (give sigma or noise_level,
            not both; default None).
        noise: ``"normal"`` (default), ``"legacy"`` or an explicit noise array, as for
            ``ms.smoothgrad``.
        seed: the seed of every image's noise stream (default 0).
        target: as the method takes it; None (default) is the top class on the clean input, kept
            for every noisy copy (``"argmax_per_sample"`` lets each copy pick its own).
        batch_size: noisy copies per method call (default None: the backend's batch for this
            input shape).
        progress: show a progress bar (default False).
        preset: the preset whose value range ``noise_level`` refers to (default None: the
            backend's ``preset``).
        **method_kwargs: the method's own keywords (``steps=`` for Integrated Gradients,
            ``layer=`` for a CAM, ...).

    Returns:
        float32 array shaped like the method's maps for x, (N, ...): their mean over the copies.

    Example:
        >>> ms.smooth(ms.integrated_gradients, be, x, n=4, noise_level=0.1, steps=8).shape
        (2, 3, 32, 32)
        >>> ms.smooth(ms.gradcam, be, x, n=4).shape
        (2, 32, 32)
        >>> bool(np.allclose(ms.smooth(ms.vanilla_gradient, be, x, n=10), ms.smoothgrad(be, x, n=10)))
        True
    """
    x = np.asarray(x, dtype=np.float32)
    target = clean_target(be, x, target)

    def per_sample(noisy, images):
        return np.asarray(method(be, noisy, target=target_rows(target, images),
                                 **method_kwargs))

    name = getattr(method, "__name__", "method")
    mean = average_over_noise(per_sample, be, x, n=n, noise_level=noise_level, sigma=sigma, noise=noise, seed=seed,
                              batch_size=batch_size, progress=progress, preset=preset, desc=f"smooth {name}")
    return mean.astype(np.float32)
