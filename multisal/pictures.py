"""Pictures of maps, drawn by the conventions of the field for each kind of map.

Every picture multisal draws (ms.overlay, ms.show, the PNG files and grids of a run, its HTML
report) comes from here, so they all follow the same rules:

- "pixel" maps (vanilla gradient, SmoothGrad, Integrated Gradients): a few extreme pixels dominate
  a gradient map, so it is clipped at its 99th percentile, as PAIR's saliency package does
  (VisualizeImageGrayscale: sum of |.| over channels, then (m - min) / (p99 - min) clipped to
  [0, 1]). Drawn over the photo as an alpha-weighted heat map (each pixel's opacity grows with its
  value, so the photo shows through where the map is low), or alone in grey (PAIR's figures).
- "signed" maps (an attribution with both signs, such as Integrated Gradients before |.|): a
  diverging colour map centred at zero (blue negative, white zero, red positive), scaled by the
  99th percentile of |m| (PAIR's VisualizeImageDiverging, symmetric), so zero is always white.
- "cam" maps (the Grad-CAM family, Score-CAM, Ablation-CAM, Occlusion, RISE): coarse and already
  scaled to [0, 1]; a jet heat map blended at 0.5 over the photo (pytorch-grad-cam's
  show_cam_on_image), scaled from the map's minimum to its maximum.

Each choice is a keyword (kind, style, cmap, percentile, alpha) and can be overridden per call. A
`shared` scale draws maps of the same kind with one scale, so the same value gets the same colour
in every panel. Colour maps are tables interpolated here with NumPy (OpenCV's, a ColorBrewer
diverging one, or any matplotlib colour map by name), so arrays need no matplotlib; only ms.show
imports it, on first use.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MissingFrameworkError, MultisalError
from .frameworks import lazy_import
from .methods import METHODS, PIXEL_MAPS

cv2 = lazy_import("cv2")
matplotlib = lazy_import("matplotlib")
matplotlib_figure = lazy_import("matplotlib.figure")
matplotlib_colors = lazy_import("matplotlib.colors")
matplotlib_cm = lazy_import("matplotlib.cm")

KINDS = ("pixel", "signed", "cam")
STYLES = ("overlay", "map")


@dataclass(frozen=True)
class Convention:
    """How one kind of map is drawn: colour maps over the photo and alone, the percentile of the
    scale's top, the overlay's opacity, and whether that opacity follows the map's value."""
    overlay_cmap: str
    map_cmap: str
    percentile: float
    alpha: float
    weighted: bool
    grey_photo: bool


CONVENTIONS = {
    "pixel": Convention(overlay_cmap="inferno", map_cmap="grey", percentile=99.0, alpha=0.9, weighted=True,
                        grey_photo=True),
    "signed": Convention(overlay_cmap="rdbu", map_cmap="rdbu", percentile=99.0, alpha=0.9, weighted=True,
                         grey_photo=True),
    "cam": Convention(overlay_cmap="jet", map_cmap="jet", percentile=100.0, alpha=0.5, weighted=False,
                      grey_photo=False),
}

# ColorBrewer's 11-class RdBu, reversed: blue for negative, #f7f7f7 at zero, red for positive.
RDBU = ("053061", "2166ac", "4393c3", "92c5de", "d1e5f0", "f7f7f7", "fddbc7", "f4a582", "d6604d", "b2182b",
        "67001f")
OPENCV_CMAPS = {"jet": "COLORMAP_JET", "turbo": "COLORMAP_TURBO", "inferno": "COLORMAP_INFERNO",
                "magma": "COLORMAP_MAGMA", "plasma": "COLORMAP_PLASMA", "viridis": "COLORMAP_VIRIDIS",
                "cividis": "COLORMAP_CIVIDIS", "hot": "COLORMAP_HOT", "bone": "COLORMAP_BONE",
                "parula": "COLORMAP_PARULA"}


def colour_table(cmap) -> np.ndarray:
    """(K, 3) float RGB in [0, 255] at evenly spaced positions 0..1: a name (OpenCV's colour maps,
    "grey", "rdbu", or any matplotlib colour map), or an array of K >= 2 RGB rows (uint8, or
    floats in [0, 1])."""
    if isinstance(cmap, str):
        if cmap in ("grey", "gray"):
            return np.array([[0, 0, 0], [255, 255, 255]], np.float64)
        if cmap == "rdbu":
            return np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in RDBU], np.float64)
        if cmap in OPENCV_CMAPS:
            ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
            bgr = cv2.applyColorMap(ramp, getattr(cv2, OPENCV_CMAPS[cmap]))
            return bgr[:, 0, ::-1].astype(np.float64)
        try:
            known = cmap in matplotlib.colormaps
        except MissingFrameworkError:
            known = False
        if not known:
            raise MultisalError(f"cmap {cmap!r}: expected grey, rdbu, {', '.join(OPENCV_CMAPS)} or a matplotlib "
                                "colour map name (with matplotlib installed)")
        return matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255.0
    table = np.asarray(cmap, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) < 2:
        raise MultisalError(f"cmap: expected a name or a (K, 3) table of RGB rows, got shape {table.shape}")
    return table if np.issubdtype(np.asarray(cmap).dtype, np.integer) else table * 255.0


def apply_colours(t: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Colours (..., 3) float of positions t in [0, 1], linearly interpolated in the table."""
    position = np.clip(t, 0, 1) * (len(table) - 1)
    low = np.minimum(np.floor(position).astype(int), len(table) - 2)
    frac = (position - low)[..., None]
    return table[low] * (1 - frac) + table[low + 1] * frac


def map_kind(method=None, saliency=None) -> str:
    """The kind of a map: "pixel" for a gradient method's, "cam" for every other method's, and
    for a map of no known method, "signed" when it has negative values, else "pixel"."""
    if method in PIXEL_MAPS:
        return "pixel"
    if method in METHODS:
        return "cam"
    if saliency is not None and np.min(saliency) < 0:
        return "signed"
    return "pixel"


def as_photo(image) -> np.ndarray:
    """An HWC uint8 RGB photo from uint8 or [0, 1] float, HWC or CHW, grey or RGB(A)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise MultisalError(f"image: expected an (H,W), (H,W,3) or (3,H,W) photo, got shape {a.shape}")
    a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
        raise MultisalError(f"image: expected finite numbers, got dtype {a.dtype}")
    low, high = float(a.min()), float(a.max())
    if low < 0 or high > 255:
        raise MultisalError(f"image: expected uint8 or floats in [0, 1], got values in [{low:.3g}, {high:.3g}] "
                            "(a model-space input? preset.invert(x[0]) gives the photo back)")
    return np.rint(a * 255 if high <= 1 else a).astype(np.uint8)


def plane(saliency, kind: str, name="map") -> np.ndarray:
    """One image's map as a float64 (H, W) plane: a (C,H,W) attribution is summed over channels,
    as |.| for pixel and cam maps and with its sign for signed maps (PAIR's two reductions)."""
    m = np.asarray(saliency, dtype=np.float64)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if m.ndim not in (2, 3) or 0 in m.shape:
        raise MultisalError(f"{name}: expected one image's (H,W) or (C,H,W) map, got shape {m.shape} "
                            "(for a batch, pass maps[i])")
    if not np.isfinite(m).all():
        raise MultisalError(f"{name}: the map has NaN or infinite values")
    if m.ndim == 3:
        m = m.sum(axis=0) if kind == "signed" else np.abs(m).sum(axis=0)
    return m


@dataclass(frozen=True)
class View:
    """The resolved way to draw one map: kind, style, colour map, opacity, and its scale
    (low..high: the values drawn at the colour map's two ends; a signed map's low is -high)."""
    kind: str
    style: str
    cmap: object
    alpha: float
    weighted: bool
    grey_photo: bool
    low: float
    high: float
    name: str = "map"

    @property
    def table(self) -> np.ndarray:
        return colour_table(self.cmap)

    def positions(self, m: np.ndarray) -> np.ndarray:
        """Positions in [0, 1] on the colour map of a plane's values (a signed map's 0 at 0.5)."""
        span = self.high - self.low
        if span <= 0:
            return np.full(m.shape, 0.5 if self.kind == "signed" else 0.0)
        return np.clip((m - self.low) / span, 0, 1)

    def draw(self, saliency, image=None) -> np.ndarray:
        """The map drawn as HWC uint8 RGB: over the photo (style "overlay"), or alone (style
        "map"); the map is resized (bilinear) to the photo's size when a photo is given."""
        m = plane(saliency, self.kind, self.name)
        photo = None if image is None else as_photo(image)
        if photo is not None and m.shape != photo.shape[:2]:
            m = cv2.resize(m.astype(np.float32), photo.shape[1::-1], interpolation=cv2.INTER_LINEAR).astype(np.float64)
        t = self.positions(m)
        colours = apply_colours(t, self.table)
        if self.style == "map" or photo is None:
            return np.rint(colours).astype(np.uint8)
        if self.grey_photo:   # a colourful photo would hide the heat map's colours (Captum shows it grey too)
            photo = np.repeat(photo @ np.array([0.299, 0.587, 0.114]), 3).reshape(photo.shape)
        if self.weighted:   # opacity grows with the value (a signed map's with its magnitude)
            weight = self.alpha * (np.abs(2 * t - 1) if self.kind == "signed" else t)
        else:
            weight = np.full(m.shape, self.alpha)
        out = photo * (1 - weight[..., None]) + colours * weight[..., None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def record(self) -> dict:
        """What a run's manifest keeps of the view (for the colour bar of its report)."""
        return {"kind": self.kind, "cmap": self.cmap if isinstance(self.cmap, str) else "custom",
                "low": float(self.low), "high": float(self.high)}


def scale(planes, kind: str, percentile: float):
    """(low, high) of one or more planes drawn together: pixel and cam maps from their minimum
    to their `percentile`-th percentile, signed maps from -p to p, p the percentile of |m|."""
    values = np.concatenate([np.ravel(p) for p in planes])
    if kind == "signed":
        top = float(np.percentile(np.abs(values), percentile))
        top = top if top > 0 else float(np.abs(values).max())
        return -top, top
    low = float(values.min())
    high = float(np.percentile(values, percentile))
    return low, (high if high > low else float(values.max()))


def _check(name, style, percentile, alpha):
    if style not in STYLES:
        raise MultisalError(f"{name}: style {style!r}: expected one of {', '.join(STYLES)}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise MultisalError(f"{name}: percentile={percentile!r}: expected a number in (0, 100]")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise MultisalError(f"{name}: alpha={alpha!r}: expected a number in [0, 1]")


def _per(value, name):
    """A keyword given once for all maps, or as {map name: value} (absent names: the default)."""
    return value.get(name) if isinstance(value, dict) else value


def views(maps: dict, kind=None, style=None, cmap=None, percentile=None, alpha=None, shared=False) -> dict:
    """{name: View} for maps {name: one image's map}. Each keyword is one value for every map or
    {name: value}; None picks the convention of the map's kind (a name of a multisal method
    picks that method's kind). With shared=True, maps of one kind share one scale."""
    chosen, planes = {}, {}
    for name, saliency in maps.items():
        label = f"map {name!r}"
        k = _per(kind, name) or map_kind(name, saliency)
        if k not in KINDS:
            raise MultisalError(f"{label}: kind {k!r}: expected one of {', '.join(KINDS)}")
        convention = CONVENTIONS[k]
        s = _per(style, name) or "overlay"
        p = _per(percentile, name)
        p = convention.percentile if p is None else p
        a = _per(alpha, name)
        a = convention.alpha if a is None else a
        _check(label, s, p, a)
        c = _per(cmap, name)
        if c is None:
            c = convention.overlay_cmap if s == "overlay" else convention.map_cmap
        colour_table(c)   # a bad colour map fails here, before anything is drawn
        planes[name] = plane(saliency, k, label)
        chosen[name] = dict(kind=k, style=s, cmap=c, alpha=float(a), weighted=convention.weighted,
                            grey_photo=convention.grey_photo, percentile=p)
    scales = {name: scale([planes[name]], c["kind"], c["percentile"]) for name, c in chosen.items()}
    if shared:
        for k in KINDS:
            names = [name for name, c in chosen.items() if c["kind"] == k]
            if names:
                together = scale([planes[n] for n in names], k, max(chosen[n]["percentile"] for n in names))
                scales.update(dict.fromkeys(names, together))
    return {name: View(**{key: v for key, v in c.items() if key != "percentile"}, low=scales[name][0],
                       high=scales[name][1], name=str(name)) for name, c in chosen.items()}


def overlay(image, saliency, method=None, kind=None, style=None, cmap=None, percentile=None, alpha=None) -> np.ndarray:
    """One map drawn over (or, with style="map", beside) its photo: HWC uint8 RGB, no matplotlib.

    Args:
        image: the photo, HWC or CHW, uint8 or floats in [0, 1] (``preset.invert(x[0])`` gives
            it back from a model input).
        saliency: one image's map, (H,W) or (C,H,W), of any size (resized to the photo).
        method: the name of the method that made it (its kind's convention is used).
        kind: "pixel", "signed" or "cam" (default: from `method`, else from the map's signs).
        style: "overlay" (default) or "map" (the map alone, grey for pixel maps).
        cmap: a colour map name (OpenCV's, "grey", "rdbu", any matplotlib one) or (K, 3) table.
        percentile: the scale's top (default 99 for pixel and signed maps, 100 for cam maps).
        alpha: the overlay's opacity (pixel and signed maps: at the scale's top).

    Example:
        >>> photo = np.zeros((4, 4, 3), np.uint8)
        >>> m = np.zeros((4, 4)); m[0, 0] = 1.0
        >>> picture = ms.overlay(photo, m, kind="pixel", cmap="grey", alpha=1.0)
        >>> picture.shape, picture.dtype, picture[0, 0].tolist(), picture[3, 3].tolist()
        ((4, 4, 3), dtype('uint8'), [255, 255, 255], [0, 0, 0])
    """
    name = method or "map"
    view = views({name: saliency}, kind=kind, style=style, cmap=cmap, percentile=percentile, alpha=alpha)[name]
    return view.draw(saliency, image)


def show(image, maps, kind=None, style=None, cmap=None, percentile=None, alpha=None, shared=False, colorbar=True,
         columns=None, size=3.0, titles=None):
    """A matplotlib Figure of the photo and one panel per map, each with its colour bar.

    `maps` is {method name: one image's map} (or a list of maps, named "map 0", "map 1", ...).
    kind, style, cmap, percentile and alpha are as in ms.overlay, given once or as {name: value};
    shared=True draws maps of the same kind on one scale (the same colour for the same value in
    every panel). `columns` panels per row (default: all in one row), `size` inches per panel,
    `titles` {name: title}. Needs matplotlib (``pip install 'multisal[plot]'``).

    Example:
        >>> photo = np.zeros((8, 8, 3), np.uint8)
        >>> fig = ms.show(photo, {"smoothgrad": np.random.rand(8, 8), "gradcam": np.random.rand(8, 8)})
        >>> [ax.get_title() for ax in fig.axes if ax.get_title()]
        ['photo', 'smoothgrad', 'gradcam']
    """
    if not isinstance(maps, dict):
        maps = {f"map {i}": m for i, m in enumerate(maps)}
    if not maps:
        raise MultisalError("maps: expected at least one map")
    photo = as_photo(image)
    resolved = views(maps, kind=kind, style=style, cmap=cmap, percentile=percentile, alpha=alpha, shared=shared)
    panels = 1 + len(maps)
    columns = panels if columns is None else max(1, int(columns))
    rows = -(-panels // columns)
    figure = matplotlib_figure.Figure(figsize=(size * columns, size * rows * 1.15), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    axes[0].imshow(photo)
    axes[0].set_title("photo")
    for ax, (name, view) in zip(axes[1:], resolved.items()):
        ax.imshow(view.draw(maps[name], photo))
        ax.set_title(str((titles or {}).get(name, name)))
        if colorbar:
            mappable = matplotlib_cm.ScalarMappable(
                norm=matplotlib_colors.Normalize(view.low, view.high),
                cmap=matplotlib_colors.ListedColormap(apply_colours(np.linspace(0, 1, 256), view.table) / 255))
            figure.colorbar(mappable, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
    for ax in axes:
        ax.set_axis_off()
    return figure
