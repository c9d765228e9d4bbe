"""Pictures of maps: colour overlays on the photo, and a grid of photo + one column per method.

PNG files are written atomically (a temporary file in the same folder, then a rename), so an
interrupted run never leaves a half-written picture behind.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..files import DEFAULT_TAG, write_atomic
from ..frameworks import lazy_import

cv2 = lazy_import("cv2")


def display_map(saliency: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """A (H,W) map, or a (C,H,W) attribution (summed |.| over channels), scaled to [0,1] for viewing.

    Gradient maps are dominated by a few extreme pixels; clipping at the 99th percentile (as PAIR's
    saliency package does for display) keeps the rest visible. Only the picture is clipped.
    """
    m = np.asarray(saliency, dtype=np.float32)
    if m.ndim == 3:
        m = np.abs(m).sum(axis=0)
    m = m - m.min()
    top = np.percentile(m, percentile)
    if top <= 0:
        top = m.max()
    return np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m)


def heatmap(values01: np.ndarray) -> np.ndarray:
    """[0,1] map -> HWC uint8 RGB with OpenCV's JET colour map."""
    u8 = np.clip(np.rint(values01 * 255), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-mapped saliency over an HWC uint8 RGB photo (map resized to the photo)."""
    m = display_map(saliency)
    h, w = rgb.shape[:2]
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(rgb, 1 - alpha, heatmap(m), alpha, 0)


def grey(saliency: np.ndarray) -> np.ndarray:
    """The map as a grey HWC uint8 RGB picture (the Chainer write-up's figures)."""
    u8 = np.rint(display_map(saliency) * 255).astype(np.uint8)
    return np.stack([u8] * 3, axis=-1)


def grid(columns, cell: int = 224) -> np.ndarray:
    """[(title, HWC uint8 RGB), ...] -> one row of equal cells with the title above each."""
    band = 22
    cells = []
    for title, img in columns:
        tile = np.full((cell + band, cell, 3), 255, np.uint8)
        tile[band:] = cv2.resize(img, (cell, cell), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, str(title)[:24], (3, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cells.append(tile)
    return np.concatenate(cells, axis=1)


def save_png(path, rgb: np.ndarray, tag: str = DEFAULT_TAG) -> Path:
    path = Path(path)
    path.parent.mkdir(exist_ok=True)
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    write_atomic(path, data.tobytes(), tag)
    return path


def save_npy(path, array: np.ndarray, tag: str = DEFAULT_TAG) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    path = Path(path)
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, buf.getvalue(), tag)
    return path
