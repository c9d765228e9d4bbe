"""Preprocessing presets: images -> model space (N,C,H,W float32) and back.

Every preset is the same affine map: model = (pixel - mean) / std per channel, pixels on the 0-255
scale, in RGB or BGR order, after a resize with a named filter. NumPy and Pillow only (no framework).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Tuple

import numpy as np

from .errors import MultisalError
from .images import PIL_Image, load_rgb

# The resize filters a preset may name, as Pillow's Image.Resampling members.
RESAMPLE = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS",
            "box": "BOX", "hamming": "HAMMING"}


@dataclass(frozen=True)
class Preset:
    name: str
    mean: Tuple[float, float, float]   # per model channel, 0-255 scale, in the model's channel order
    std: Tuple[float, float, float]
    bgr: bool = False
    resample: str = "bilinear"
    size: Tuple[int, int] = (224, 224)  # (height, width) used when apply() gets no size

    @property
    def channel_range(self) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per channel of a clean input in model space."""
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        return (0.0 - mean) / std, (255.0 - mean) / std

    @property
    def value_range(self) -> Tuple[float, float]:
        """Channel-averaged (lo, hi) of a clean input; its width sets sigma = noise_level * width.

        Under chainer-vgg16 the width is 255, so noise_level 0.2 is the write-up's sigma of 51.
        """
        lo, hi = self.channel_range
        return float(lo.mean()), float(hi.mean())

    def apply(self, images, size=None) -> np.ndarray:
        """Paths, PIL images or HWC uint8 RGB arrays (one or a list) -> (N,C,H,W) float32."""
        height, width = self.size if size is None else check_size(size)
        batch = []
        for img in _as_list(images):
            rgb = load_rgb(img)
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), PIL_Image.Resampling[RESAMPLE[self.resample]])
            pixels = np.asarray(rgb, dtype=np.float32)
            if self.bgr:
                pixels = pixels[:, :, ::-1]
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            batch.append(pixels.transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(batch), dtype=np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        """(N,C,H,W) or (C,H,W) model-space array -> HWC uint8 RGB (with the same leading shape)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise MultisalError(f"invert() expects (N,3,H,W) or (3,H,W), got shape {x.shape}")
        pixels = np.moveaxis(x, -3, -1) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        if self.bgr:
            pixels = pixels[..., ::-1]
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    def with_options(self, **options) -> "Preset":
        if "resample" in options and options["resample"] not in RESAMPLE:
            raise MultisalError(f"unknown resample filter {options['resample']!r}: expected one of {', '.join(RESAMPLE)}")
        unknown = set(options) - {"resample", "size"}
        if unknown:
            raise MultisalError(f"unknown preset option {sorted(unknown)[0]!r}: expected resample or size")
        if "size" in options:
            options["size"] = check_size(options["size"])
        return replace(self, **options)


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

PRESETS = {
    # The Chainer SmoothGrad write-up: Pillow resize (in 2017 Pillow's default filter was NEAREST;
    # since Pillow 7 it is BICUBIC, so the filter is named here and can be chosen), RGB->BGR,
    # subtract the Caffe VGG mean (BGR order), no scaling.
    "chainer-vgg16": Preset("chainer-vgg16", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0),
                            bgr=True, resample="nearest"),
    "torchvision-imagenet": Preset("torchvision-imagenet", mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
    # EfficientNet-Lite0's packaged weights expect the TF-Lite "inception style"
    # (pixel - 127) / 128 on 0..255 RGB pixels, i.e. mean 127/255 and std 128/255
    # on [0, 1] inputs. How it was established (the figures: README, "Presets"):
    #  * source: Google's EfficientNet-Lite builder (tensorflow/tpu, lite/
    #    efficientnet_lite_builder.py) sets MEAN_RGB = [127.0]*3, STDDEV_RGB =
    #    [128.0]*3 ("edge models use inception-style MEAN and STDDEV"), and these
    #    weights are ml-illustrated's conversion of that TF checkpoint;
    #  * BatchNorm statistics: on natural photos the stem conv's output matches
    #    _bn0's running variance and mean more closely with this normalisation than
    #    with ImageNet mean/std;
    #  * predictions: both candidates give the same top-1 classes on the photos, so
    #    top-1 alone does not decide; their probabilities do not single out either.
    "efficientnet-lite": Preset("efficientnet-lite", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
    "raw": Preset("raw", mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),
}


def get_preset(name, **options) -> Preset:
    if isinstance(name, Preset):
        preset = name
    elif name in PRESETS:
        preset = PRESETS[name]
    else:
        raise MultisalError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return preset.with_options(**options) if options else preset


def check_size(size) -> Tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise MultisalError(f"size {size!r} must be (height, width)") from None
    if not (1 <= height <= 8192 and 1 <= width <= 8192):
        raise MultisalError(f"size {size!r} out of range: height and width must be 1..8192")
    return height, width


def _as_list(images):
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise MultisalError("no images given")
        return list(images)
    return [images]


