"""Image decoding: files, bytes, PIL images and arrays -> 8-bit RGB, refusing what is not an image.

Pillow is imported when the first image is decoded (multisal.frameworks).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .errors import MultisalError
from .frameworks import lazy_import

PIL_Image = lazy_import("PIL.Image")

# Decompression bombs: refuse anything larger before decoding it.
MAX_IMAGE_PIXELS = 64_000_000


def load_rgb(image, name=None) -> PIL_Image.Image:
    """A path, the bytes of an image file, a PIL image or an HWC uint8 array -> PIL RGB image,
    refusing oversized or unreadable files. `name` is what errors call it (default: the path)."""
    if isinstance(image, (str, os.PathLike, bytes)):
        if isinstance(image, bytes):
            label, opener = str(name or "<bytes>"), io.BytesIO(image)
        else:
            label, opener = str(name or image), Path(image)
        try:
            with PIL_Image.open(opener) as opened:
                w, h = opened.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise MultisalError(f"image {label!r} is {w}x{h} pixels, over the limit of "
                                        f"{MAX_IMAGE_PIXELS} pixels")
                return opened.convert("RGB")
        except MultisalError:
            raise
        except FileNotFoundError:
            raise MultisalError(f"image {label!r} not found") from None
        except (OSError, PIL_Image.DecompressionBombError, ValueError) as err:
            # PIL names a stream by its repr; name it as a path would be named
            reason = str(err).replace(repr(opener), repr(label))
            raise MultisalError(f"cannot read image {label!r}: {reason}") from None
    if isinstance(image, PIL_Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise MultisalError(f"image arrays must be uint8 HWC RGB, got dtype {image.dtype}")
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise MultisalError(f"image arrays must be HWC RGB (H,W,3), got shape {image.shape}")
        return PIL_Image.fromarray(np.ascontiguousarray(image[:, :, :3]), "RGB")
    raise MultisalError(f"cannot use {type(image).__name__} as an image: expected a path, a PIL image or a uint8 array")
