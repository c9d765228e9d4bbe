"""Image decoding: files, bytes, PIL images and arrays -> 8-bit RGB, refusing what is not an image.

Pillow is imported when the first image is decoded (multisal.frameworks).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .errors import MultisalError
from .files import is_regular_file
from .frameworks import lazy_import

PIL_Image = lazy_import("PIL.Image")
PIL_ImageOps = lazy_import("PIL.ImageOps")

# Decompression bombs: refuse anything larger before decoding it.
MAX_IMAGE_PIXELS = 64_000_000
# The formats an input may be in. Pillow identifies many more, some through external programs
# (PostScript goes to Ghostscript, where a crafted file can loop for ever): none of those.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Pillow modes whose values do not fit 8 bits: scaled by their own range, not clipped.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_rgb(image, name=None):
    """A path, the bytes of an image file, a PIL image or an HWC uint8 array -> PIL RGB image (8-bit).

    Files are decoded only from FORMATS, turned upright by their EXIF orientation, and refused when
    they are not regular files (a FIFO would block) or over MAX_IMAGE_PIXELS. 16-bit, 32-bit
    integer and float images are scaled from their darkest to their brightest value to 0..255
    (clipping them at 255 would saturate them); palette and alpha images become plain RGB.
    `name` is what errors call the image (default: the path)."""
    if isinstance(image, (str, os.PathLike, bytes)):
        if isinstance(image, bytes):
            label, opener = str(name or "<bytes>"), io.BytesIO(image)
        else:
            label, opener = str(name or image), Path(image)
            if not os.path.lexists(opener):
                raise MultisalError(f"image {label!r} not found")
            if not is_regular_file(opener):
                raise MultisalError(f"image {label!r} is not a regular file (a folder, a pipe or a device)")
        try:
            with PIL_Image.open(opener, formats=FORMATS) as opened:
                w, h = opened.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise MultisalError(f"image {label!r} is {w}x{h} pixels, over the limit of "
                                        f"{MAX_IMAGE_PIXELS} pixels")
                return to_rgb8(PIL_ImageOps.exif_transpose(opened))
        except MultisalError:
            raise
        except FileNotFoundError:
            raise MultisalError(f"image {label!r} not found") from None
        except (OSError, PIL_Image.DecompressionBombError, ValueError, SyntaxError) as err:
            # PIL names a stream by its repr; name it as a path would be named
            reason = " ".join(str(err).replace(repr(opener), repr(label)).split())
            raise MultisalError(f"cannot read image {label!r}: {reason}") from None
    if isinstance(image, PIL_Image.Image):
        return to_rgb8(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise MultisalError(f"image arrays must be uint8 HWC RGB, got dtype {image.dtype}")
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise MultisalError(f"image arrays must be HWC RGB (H,W,3), got shape {image.shape}")
        return PIL_Image.fromarray(np.ascontiguousarray(image[:, :, :3]), "RGB")
    raise MultisalError(f"cannot use {type(image).__name__} as an image: expected a path, a PIL image or a uint8 array")


def to_rgb8(image):
    """A PIL image as 8-bit RGB; modes deeper than 8 bits are scaled by their own value range."""
    if image.mode in _DEEP_MODES:
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.clip(values, 0, 255)
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return PIL_Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    return image.convert("RGB")
