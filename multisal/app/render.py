"""The pictures a run writes: each map over the photo, and a grid of photo + one column per
method with colour bars, drawn by multisal.pictures' conventions for each kind of map.

PNG files are written atomically (a temporary file in the same folder, then a rename), so an
interrupted run never leaves a half-written picture behind.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..files import DEFAULT_TAG, write_atomic
from ..frameworks import lazy_import
from ..pictures import apply_colours, views

cv2 = lazy_import("cv2")


def overlay(rgb: np.ndarray, saliency: np.ndarray, method=None):
    """(picture, view): the map drawn over an HWC uint8 RGB photo by its kind's convention
    (multisal.pictures; `method` names the method that made it), and the View it was drawn with."""
    view = views({method or "map": saliency})[method or "map"]
    return view.draw(saliency, rgb), view


def grey(saliency: np.ndarray) -> np.ndarray:
    """A pixel map alone in grey, clipped at its 99th percentile (PAIR's and the Chainer write-up's figures)."""
    return views({"map": saliency}, kind="pixel", style="map")["map"].draw(saliency)


BAND = 22        # the title's band above a cell
BAR = 30         # the colour bar's band below a cell: the bar, then its two ends' values


def grid(columns, cell: int = 224) -> np.ndarray:
    """[(title, HWC uint8 RGB) or (title, picture, View), ...] -> one row of equal cells, the
    title above each and, under the cells drawn with a View, its colour bar from low to high."""
    bars = any(len(c) > 2 and c[2] is not None for c in columns)
    cells = []
    for title, img, *rest in columns:
        view = rest[0] if rest else None
        tile = np.full((BAND + cell + (BAR if bars else 0), cell, 3), 255, np.uint8)
        tile[BAND:BAND + cell] = cv2.resize(img, (cell, cell), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, str(title)[:24], (3, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        if view is not None:
            _colour_bar(tile[BAND + cell:], view)
        cells.append(tile)
    return np.concatenate(cells, axis=1)


def _colour_bar(band: np.ndarray, view) -> None:
    """Draw the view's colour map as a bar across `band`, with the values at its two ends."""
    width = band.shape[1] - 8
    colours = np.rint(apply_colours(np.linspace(0, 1, width), view.table)).astype(np.uint8)
    band[3:11, 4:4 + width] = colours[None]
    for text, x in ((f"{view.low:.3g}", 4), (f"{view.high:.3g}", None)):
        (w, _h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.38, 1)
        cv2.putText(band, text, (x if x is not None else band.shape[1] - 4 - w, 25), cv2.FONT_HERSHEY_SIMPLEX,
                    0.38, (0, 0, 0), 1, cv2.LINE_AA)


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
