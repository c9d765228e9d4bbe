"""The inputs of a run: image files, globs, folders, .txt lists and scikit-image's photos, and the
folder each input's outputs go to."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np

from ..errors import MultisalError
from ..files import read_text
from ..frameworks import lazy_import
from ..images import load_rgb

skimage_data = lazy_import("skimage.data")

# scikit-image's bundled photos (no download), usable as inputs "skimage:chelsea".
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page",
                  "rocket", "text")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def expand_inputs(patterns):
    """Image sources from files, globs, folders (their images), .txt lists (one path a line,
    relative to the list) and skimage:NAME. A pattern that yields nothing stays in the list, so it
    fails as an input with its reason instead of vanishing."""
    sources = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if pattern.startswith("skimage:"):
            found = [pattern]
        elif path.lower().endswith(".txt") and os.path.isfile(path):
            found = _listed(path)
        elif os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif not os.path.exists(path) and glob.has_magic(path):
            found = sorted(m for m in glob.glob(path, recursive=True) if os.path.isfile(m))
        else:
            found = [path]
        sources.extend(found or [pattern])
    return sources


def _listed(list_file):
    folder = os.path.dirname(list_file)
    lines = [line.strip() for line in read_text(list_file, "list of images").splitlines()]
    return [line if line.startswith("skimage:") else os.path.join(folder, os.path.expanduser(line))
            for line in lines if line and not line.startswith("#")]


def read_image(source, data: bytes = None) -> np.ndarray:
    """HWC uint8 RGB of a source (decoded from `data` when its bytes were read already);
    MultisalError (one line) when it cannot be read."""
    if source.startswith("skimage:"):
        name = source[len("skimage:"):]
        if name not in SKIMAGE_PHOTOS:
            raise MultisalError(f"unknown scikit-image photo {name!r}: expected one of {', '.join(SKIMAGE_PHOTOS)}")
        return np.asarray(load_rgb(getattr(skimage_data, name)()))
    if os.path.isdir(source):
        raise MultisalError(f"folder {source!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if not os.path.exists(source) and glob.has_magic(source):
        raise MultisalError(f"no file matches {source!r}")
    return np.asarray(load_rgb(source if data is None else data, name=source))


def folder_names(sources, taken=()):
    """One folder name per source, from its file name, safe on any file system and unique within the
    run (case-insensitively, for macOS and Windows) and against the lower-case names in `taken`:
    chelsea, chelsea-2, ..."""
    names, taken = [], set(taken)
    for source in sources:
        stem = source[len("skimage:"):] if source.startswith("skimage:") else Path(source).stem
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:64] or "input"
        name, k = base, 1
        while name.lower() in taken:
            k += 1
            name = f"{base}-{k}"
        taken.add(name.lower())
        names.append(name)
    return names
