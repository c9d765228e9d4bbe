"""Noise streams for SmoothGrad and Smooth Grad-CAM++.

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
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .errors import MultisalError


class NoiseStream:
    def __init__(self, noise, x: np.ndarray, n: int, sigma: float, seed: int):
        self.x = x
        self.sigma = float(sigma)
        if isinstance(noise, str):
            self._rngs = [make_rng(noise, seed) for _ in range(len(x))]
            self.kind, self.n, self._array = noise, int(n), None
        else:
            arr = np.asarray(noise)
            if arr.ndim == 4 and arr.shape[1:] == x.shape[1:]:
                arr = np.broadcast_to(arr, (len(x), *arr.shape))
            if arr.ndim != 5 or arr.shape[0] != len(x) or arr.shape[2:] != x.shape[1:]:
                raise MultisalError(f"noise array has shape {arr.shape}: expected (n,{','.join(map(str, x.shape[1:]))}) "
                                    f"or ({len(x)},n,{','.join(map(str, x.shape[1:]))})")
            self.kind, self.n, self._array = "array", arr.shape[1], arr
        if self.n < 1:
            raise MultisalError(f"n={n}: the number of noisy samples must be at least 1")

    def batches(self, step: int, progress=False, desc="samples"):
        """Yield (image index per sample, noisy inputs) in chunks of at most `step` samples."""
        for start, stop in tqdm(even_chunks(len(self.x) * self.n, step), desc=desc, disable=not progress, unit="batch"):
            yield np.arange(start, stop) // self.n, self.take(start, stop)

    def take(self, start: int, stop: int) -> np.ndarray:
        """Noisy inputs for flat sample numbers start..stop-1 (image-major: image 0's samples, then
        image 1's, ...; asked for in order, as draws are sequential)."""
        images = np.arange(start, stop) // self.n
        if self.kind == "array":
            samples = np.arange(start, stop) % self.n
            return (self.x[images] + self._array[images, samples]).astype(np.float32)
        return noisy_copies(self._rngs, self.kind, self.x, images, self.sigma)


def noisy_copies(rngs, kind, x: np.ndarray, images: np.ndarray, sigma: float) -> np.ndarray:
    """x[images] + noise, each row's noise drawn from its image's own stream rngs[image]. Rows of one
    image must be contiguous and in sample order."""
    out = np.empty((len(images), *x.shape[1:]), np.float32)
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(images)]):
        i = images[lo]
        out[lo:hi] = add_noise(rngs[i], kind, np.broadcast_to(x[i], (hi - lo, *x.shape[1:])), sigma)
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
    if kind == "normal":
        return np.random.Generator(np.random.PCG64(seed))
    if kind == "legacy":
        return np.random.RandomState(seed)
    raise MultisalError(f"unknown noise {kind!r}: expected 'normal', 'legacy' or an array (n,C,H,W)")


class _DefaultNoiseLevel(float):
    """The default noise_level: a float that can be told apart from a value the caller passed."""


DEFAULT_NOISE_LEVEL = _DefaultNoiseLevel(0.15)


def resolve_sigma(noise_level, sigma, value_range, x: np.ndarray) -> float:
    """sigma is absolute (model space); noise_level is relative to the preset's value range.

    Without a preset the range is the input's own (x.max() - x.min()), the SmoothGrad paper's choice.
    """
    if sigma is not None:
        if noise_level is not DEFAULT_NOISE_LEVEL:
            raise MultisalError(f"give sigma or noise_level, not both (got sigma={sigma}, noise_level={noise_level})")
        if not float(sigma) >= 0:
            raise MultisalError(f"sigma={sigma} must be >= 0")
        return float(sigma)
    if not float(noise_level) >= 0:
        raise MultisalError(f"noise_level={noise_level} must be >= 0")
    width = (value_range[1] - value_range[0]) if value_range is not None else float(x.max() - x.min())
    return float(noise_level) * width


def value_range_of(be, preset):
    """The value range noise_level refers to: the preset given, else the backend's, else None."""
    preset = preset if preset is not None else getattr(be, "preset", None)
    if preset is None:
        return None
    from multisal.models.presets import get_preset
    return get_preset(preset).value_range



def even_chunks(total: int, step: int):
    """[(start, stop), ...] covering range(total) in chunks of at most `step` whose sizes differ by at
    most one: 50 samples at 6 a batch run as 9 batches of 5-6, not 8 of 6 and a small, slow one of 2."""
    count = -(-total // max(1, int(step)))
    edges = [total * k // count for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))
