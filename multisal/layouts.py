"""How a layer's activation reads as feature maps: its layout, recognised once for every backend.

A CAM method weights feature maps A_k over a grid of positions. Convolutional networks give those
as (N, C, h, w) ("nchw"); Swin, ConvNeXt's blocks and other channels-last code give (N, h, w, C)
("nhwc"); vision transformers and MLP-Mixers give token sequences (N, T, C) ("tokens"), in which
the first tokens may be class, distillation or register tokens (the prefix) and the others are the
patches of an h x w grid in row-major order. A Layout turns any of them into (N, C, h, w) and back.

Recognition reads a layer's shape against the input's size (H, W) and against the layers before
it, which the backends describe as LayerRecords in execution order:
- a 4-D activation is NCHW where its last two axes are a grid of the input's proportions (a
  stride of the input, give or take the pixels a padding loses), NHWC where only its middle two are
  (or where the backend knows it is channels-last, e.g. after an ONNX Transpose to (0, 2, 3, 1));
- a 3-D activation is tokens where T less a prefix of at most MAX_PREFIX_TOKENS is a grid: the
  grid of an earlier layer (the patch embedding's convolution), else the h x w of the input's
  aspect ratio at one integer stride;
- attention probabilities (softmax outputs, (N, heads, T, T)) and attention internals (N, heads, T,
  d), whose second axis holds a token count, are no feature maps.

The default CAM layer (default_layer) is the last spatial layer with more than one position, as
for CNNs, except in models whose token sequence carries prefix tokens into attention (ViT, DeiT,
BEiT, EVA, CaiT): their last block mixes the patches into the class token through its attention
only, so the default there is the input of the norm that feeds the last attention (the last block's
``norm1``), pytorch-grad-cam's recommendation for ViTs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import MultisalError

LAYOUTS = ("nchw", "nhwc", "tokens")
# Class + distillation + up to 8 register tokens is 10 in timm's models; 16 leaves room.
MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class Layout:
    """Where an activation's feature maps and grid positions are: kind "nchw", "nhwc" or "tokens",
    grid (h, w), and for tokens the number of prefix tokens before the grid."""
    kind: str
    grid: Tuple[int, int]
    prefix: int = 0

    def to_maps(self, a: np.ndarray) -> np.ndarray:
        """(N, C, h, w) feature maps of an activation (or gradient) in this layout."""
        h, w = self.grid
        if self.kind == "nchw":
            return a
        if self.kind == "nhwc":
            return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
        grid = a[:, self.prefix:, :]
        return np.ascontiguousarray(grid.reshape(a.shape[0], h, w, a.shape[2]).transpose(0, 3, 1, 2))

    def from_maps(self, maps: np.ndarray, like: np.ndarray) -> np.ndarray:
        """The activation in this layout whose feature maps are `maps` (N, C, h, w); the prefix
        tokens are taken from `like` (an activation of this layer, one row per map)."""
        if self.kind == "nchw":
            return maps
        if self.kind == "nhwc":
            return np.ascontiguousarray(maps.transpose(0, 2, 3, 1))
        out = np.array(like, dtype=maps.dtype, copy=True)
        out[:, self.prefix:, :] = maps.transpose(0, 2, 3, 1).reshape(len(maps), -1, maps.shape[1])
        return out

    def describe(self) -> str:
        """How `multisal layers` shows it: "nchw 7x7", "nhwc 7x7", "tokens 1+14x14"."""
        grid = f"{self.grid[0]}x{self.grid[1]}"
        return f"tokens {self.prefix}+{grid}" if self.kind == "tokens" else f"{self.kind} {grid}"


@dataclass
class LayerRecord:
    """What a backend says about one layer for recognition: its name, its activation's shape
    without the batch, what computes it ("norm" for a normalisation, "softmax" for a softmax, ""
    otherwise), the layer its first input is (None if none is), and a layout the backend knows from
    its graph (None: read it from the shape)."""
    name: str
    shape: tuple
    kind: str = ""
    source: Optional[str] = None
    hint: Optional[str] = None


def plausible_grid(h, w, height, width) -> bool:
    """Whether h x w positions can be the input's H x W seen at some stride: no larger than the
    input and of its proportions, up to a pixel and a quarter (what valid convolutions and odd
    paddings lose)."""
    if h < 1 or w < 1 or h > height or w > width:
        return False
    expected_h = w * height / width
    return abs(h - expected_h) <= 1 + 0.25 * max(h, expected_h)


def strided_grid(n, height, width) -> Optional[Tuple[int, int]]:
    """The (h, w) with h * w = n that the input's H x W gives at one integer stride s, both sides
    rounded the same way (H/s and W/s both down, or both up, as one convolution or patch size does),
    or None."""
    for s in range(1, max(height, width) + 1):
        for h, w in ((height // s, width // s), (-(-height // s), -(-width // s))):
            if h * w == n:
                return h, w
    return None


def token_grid_of(tokens, height, width, grids=()) -> Optional[Tuple[int, Tuple[int, int]]]:
    """(prefix, (h, w)) of a sequence of `tokens` for an H x W input: the grid of an earlier layer
    (the latest among those leaving the fewest prefix tokens), else the smallest prefix that leaves
    the input's grid at one integer stride; None if neither fits."""
    best = None
    for grid in grids:
        prefix = tokens - grid[0] * grid[1]
        if 0 <= prefix <= MAX_PREFIX_TOKENS and (best is None or prefix <= best[0]):
            best = (prefix, tuple(grid))
    if best is not None:
        return best
    for prefix in range(0, min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        grid = strided_grid(tokens - prefix, height, width)
        if grid is not None:
            return prefix, grid
    return None


def recognise(shape, input_hw, grids=(), hint=None) -> Optional[Layout]:
    """The layout of an activation of `shape` (without the batch) for an input of size input_hw,
    given the grids of the layers before it and the backend's hint; None if it is no grid."""
    height, width = input_hw
    shape = tuple(shape)
    if len(shape) == 3:
        a, b, c = shape
        if hint == "nchw":
            return Layout("nchw", (b, c))
        nchw, nhwc = plausible_grid(b, c, height, width), plausible_grid(a, b, height, width)
        if hint == "nhwc" and nhwc:
            return Layout("nhwc", (a, b))
        if nchw:
            return Layout("nchw", (b, c))
        if nhwc:
            return Layout("nhwc", (a, b))
        return None
    if len(shape) == 2:
        found = token_grid_of(shape[0], height, width, grids)
        return None if found is None else Layout("tokens", found[1], found[0])
    return None


def recognise_layers(records: Sequence[LayerRecord], input_hw) -> dict:
    """{name: Layout} of the records that are feature maps with more than one position, in their
    order. Softmax outputs are left out, and so are 4-D activations whose second axis is as long as
    an earlier token sequence (and longer than any grid side): attention's (heads, T, T) and
    (heads, T, d)."""
    grids, token_counts, found = [], set(), {}
    for record in records:
        shape = tuple(record.shape)
        if record.kind == "softmax":
            continue
        if len(shape) == 3 and record.hint != "nchw":
            longest_side = max((max(g) for g in grids), default=0)
            if shape[1] in token_counts and shape[1] > longest_side:
                continue
        layout = recognise(shape, input_hw, grids, record.hint)
        if layout is None or layout.grid[0] * layout.grid[1] <= 1:
            continue
        if layout.kind == "tokens":
            token_counts.add(shape[0])
        grids.append(layout.grid)
        found[record.name] = layout
    return found


def attention_layers(records: Sequence[LayerRecord], layouts: dict) -> list:
    """Names of the softmax outputs shaped (heads, T, T) over a token sequence of T tokens that
    `layouts` knows: the attention probabilities of the model's (global) attention, in order."""
    token_counts = {r.shape[0] for r in records if r.name in layouts and layouts[r.name].kind == "tokens"}
    return [r.name for r in records if r.kind == "softmax" and len(r.shape) == 3
            and r.shape[1] == r.shape[2] and r.shape[1] in token_counts]


def default_layer(records: Sequence[LayerRecord], layouts: dict) -> Optional[str]:
    """The layer a CAM reads by default (see the module docstring), or None if there is no grid."""
    if not layouts:
        return None
    by_name = {r.name: r for r in records}
    attention = attention_layers(records, layouts)
    if attention:
        last = attention[-1]
        tokens = by_name[last].shape[1]
        order = [r.name for r in records]
        before = order[:order.index(last)]
        norms = [n for n in before if by_name[n].kind == "norm" and n in layouts
                 and layouts[n].kind == "tokens" and by_name[n].shape[0] == tokens and layouts[n].prefix > 0]
        if norms:
            source = by_name[norms[-1]].source
            return source if source in layouts and layouts[source].kind == "tokens" else norms[-1]
    return list(layouts)[-1]


def resolve_layout(layer, activation_shape, input_hw, known=None, layout=None, prefix_tokens=None, token_grid=None,
                   grids=()) -> Layout:
    """The Layout of `layer`'s activation of `activation_shape` (batch first): the recognised one
    (`known`), or what the overrides say, checked against the shape; one line naming the layer
    and what was expected where they do not fit."""
    full = tuple(int(d) for d in activation_shape)
    shape = full[1:]
    if layout is not None and layout not in LAYOUTS:
        raise MultisalError(f"layer {layer!r}: layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    tokens_asked = prefix_tokens is not None or token_grid is not None
    if tokens_asked and layout not in (None, "tokens"):
        raise MultisalError(f"layer {layer!r}: prefix_tokens and token_grid go with layout='tokens', not {layout!r}")
    if layout is None and not tokens_asked and known is not None:
        return known
    kind = layout or ("tokens" if tokens_asked or len(shape) == 2 else None)
    if kind in ("nchw", "nhwc"):
        if len(shape) != 3:
            raise MultisalError(f"layer {layer!r} gives an activation of shape {full}; layout={kind!r} "
                                f"needs a 4-D (N,{'C,H,W' if kind == 'nchw' else 'H,W,C'}) one")
        return Layout(kind, shape[1:] if kind == "nchw" else shape[:2])
    if kind == "tokens":
        return _token_layout(layer, full, input_hw, prefix_tokens, token_grid, grids)
    found = recognise(shape, input_hw, grids)
    if found is None:
        raise MultisalError(f"layer {layer!r} gives an activation of shape {full}; a CAM needs a 4-D (N,C,H,W) or "
                            f"(N,H,W,C) one or tokens (N,T,C) on a grid of the {input_hw[0]}x{input_hw[1]} input "
                            "(layout= says which)")
    return found


def _token_layout(layer, full, input_hw, prefix_tokens, token_grid, grids):
    shape = full[1:]
    if len(shape) != 2:
        raise MultisalError(f"layer {layer!r} gives an activation of shape {full}; layout='tokens' needs "
                            "a 3-D (N,T,C) one")
    tokens = shape[0]
    if prefix_tokens is not None and (isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, (int, np.integer))
                                      or not 0 <= prefix_tokens < tokens):
        raise MultisalError(f"layer {layer!r}: prefix_tokens={prefix_tokens!r} must be an integer 0..{tokens - 1} "
                            f"(the layer has {tokens} tokens)")
    if token_grid is not None:
        try:
            h, w = (int(v.__index__()) for v in token_grid)
        except (TypeError, ValueError, AttributeError):
            raise MultisalError(f"layer {layer!r}: token_grid={token_grid!r} must be (rows, columns), two "
                                "integers") from None
        prefix = tokens - h * w if prefix_tokens is None else int(prefix_tokens)
        if h < 1 or w < 1 or prefix < 0 or prefix + h * w != tokens:
            raise MultisalError(f"layer {layer!r} has {tokens} tokens, which do not fit token_grid={(h, w)}"
                                + (f" after {prefix} prefix tokens" if prefix_tokens is not None else "")
                                + f": expected prefix + rows * columns = {tokens}")
        return Layout("tokens", (h, w), prefix)
    height, width = input_hw
    if prefix_tokens is not None:
        grid = strided_grid(tokens - prefix_tokens, height, width)
        found = None if grid is None else (int(prefix_tokens), grid)
    else:
        found = token_grid_of(tokens, height, width, grids)
    if found is None:
        after = f"after {prefix_tokens} prefix tokens " if prefix_tokens is not None else ""
        raise MultisalError(f"layer {layer!r} has {tokens} tokens, which {after}fit no grid of a {height}x{width} "
                            f"input: expected T = prefix (at most {MAX_PREFIX_TOKENS}) + h*w with h x w the input "
                            "at one stride; give token_grid=(h, w) and prefix_tokens=")
    return Layout("tokens", found[1], found[0])
