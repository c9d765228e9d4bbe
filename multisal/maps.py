"""Small array operations shared by the methods: channel reduction, resizing and scaling of maps."""
from __future__ import annotations

import numpy as np

from .errors import MultisalError
from .frameworks import lazy_import

cv2 = lazy_import("cv2")

CHANNEL_REDUCE = ("max", "mean", None)


def check_channel_reduce(channel_reduce):
    if channel_reduce not in CHANNEL_REDUCE:
        raise MultisalError(f"unknown channel_reduce {channel_reduce!r}: expected 'max', 'mean' or None")
    return channel_reduce


def reduce_channels(grad: np.ndarray, channel_reduce="max", abs=True, square=False) -> np.ndarray:
    """Per-sample map of an (N,C,H,W) gradient: |g| (or g**2), then max or mean over channels."""
    g = np.square(grad) if square else (np.abs(grad) if abs else grad)
    if channel_reduce == "max":
        return g.max(axis=1)
    if channel_reduce == "mean":
        return g.mean(axis=1)
    return g


def resize_maps(maps: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of (..., h, w) maps to size (H, W) (half-pixel centres, like torch's align_corners=False)."""
    height, width = size
    flat = maps.reshape(-1, *maps.shape[-2:]).astype(np.float32)
    out = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in flat])
    return out.reshape(*maps.shape[:-2], height, width)


def scale_01(maps: np.ndarray) -> np.ndarray:
    """Scale each (h, w) map to [0, 1]; a constant map becomes zeros."""
    flat = maps.reshape(-1, *maps.shape[-2:]).astype(np.float32)
    lo = flat.min(axis=(1, 2), keepdims=True)
    span = flat.max(axis=(1, 2), keepdims=True) - lo
    out = np.where(span > 0, (flat - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)
    return out.reshape(maps.shape)


def add_per_image(sums: np.ndarray, images: np.ndarray, values: np.ndarray) -> None:
    """sums[i] += the sum of values over the samples of image i (samples come image by image)."""
    for i in np.unique(images):
        sums[i] += values[images == i].sum(axis=0)
