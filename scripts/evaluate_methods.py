#!/usr/bin/env python
"""Every method and every metric of multisal on EfficientNet-Lite0 (its packaged ImageNet weights)
over real photos that installed packages carry: scikit-image's (chelsea, coffee, astronaut, rocket),
scikit-learn's sample images (china, flower) and matplotlib's sample data (grace_hopper), the
first --images of them taken in turn from each source. Prints one table, methods (and the random
and Sobel baselines) by metrics, each cell the mean ± standard deviation over the photos, with
the best mean per column starred; --json saves every score.

Each photo is explained for its top class. By default everything runs with lighter settings than
its defaults so that the whole table takes minutes on a shared CPU: inputs of 128 x 128 (SIZE)
instead of 224 x 224; METHOD_OPTIONS: fewer SmoothGrad samples, IG steps and RISE masks, a coarser
Occlusion window, and one CAM layer for all CAM methods, _blocks.10 (112 channels), where Score-CAM
and Ablation-CAM cost one forward pass per channel; METRIC_OPTIONS: 8 deletion/insertion steps,
ROAD at 25/50/75%, the randomisation cascade in 2 steps (the top half of the layers, then all).
Pass --full for 224 x 224 and every method's and metric's defaults.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import skimage.io

import multisal as ms
from multisal import models
from multisal.app.demo import demo_photos
from multisal.evaluation import HIGHER_IS_BETTER
from multisal.frameworks import available, lazy_import

# Optional sources of photos, used where installed.
sklearn_datasets = lazy_import("sklearn.datasets")
matplotlib_cbook = lazy_import("matplotlib.cbook")

CAM_LAYER = "_blocks.10"
METHOD_OPTIONS = {
    "smoothgrad": {"n": 8}, "integrated_gradients": {"steps": 8}, "smooth_gradcam_pp": {"n": 4},
    "rise": {"n_masks": 200}, "occlusion": {"window": (3, 32, 32), "stride": (3, 16, 16)},
}
SIZE = 128   # the input size of the light settings (--full: the model's 224)
METRIC_OPTIONS = {"step": SIZE * SIZE // 8, "percentages": (25, 50, 75), "randomization_steps": 2}


def photos(count):
    """(name, HWC uint8 RGB) of up to `count` photos, one from each source in turn."""
    sources = [list(demo_photos().items())]
    if available("sklearn"):
        data = sklearn_datasets.load_sample_images()
        sources.append([(Path(f).stem, img) for f, img in zip(data.filenames, data.images)])
    if available("matplotlib"):
        with matplotlib_cbook.get_sample_data("grace_hopper.jpg") as f:
            sources.append([("grace_hopper", skimage.io.imread(f))])
    picked = []
    for k in range(max(len(s) for s in sources)):
        picked += [s[k] for s in sources if k < len(s)]
    return picked[:count]


def method_options(name, full):
    options = {} if full else dict(METHOD_OPTIONS.get(name, {}))
    if not full and "layer" in inspect.signature(ms.METHODS[name]).parameters:
        options["layer"] = CAM_LAYER
    return options


def table(scores, metrics):
    """Rows of 'mean ± std' per map and metric, the best mean per column starred."""
    means = {name: {m: float(np.mean(v)) for m, v in row.items()} for name, row in scores.items()}
    best = {m: (max if HIGHER_IS_BETTER[m] else min)(means[n][m] for n in means) for m in metrics}
    head = ["map"] + [f"{m} {'(+)' if HIGHER_IS_BETTER[m] else '(-)'}" for m in metrics]
    rows = [head]
    for name, row in scores.items():
        rows.append([name] + [f"{np.mean(row[m]):.3f} ± {np.std(row[m]):.3f}{'*' if means[name][m] == best[m] else ' '}"
                              for m in metrics])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3, help="how many photos (default 3; 7 are available)")
    parser.add_argument("--full", action="store_true", help="every method's and metric's default settings")
    parser.add_argument("--json", default="out/evaluate_methods.json", help="where to save every score")
    args = parser.parse_args(argv)
    ms.tune_malloc()
    net = models.load("efficientnet-lite0")
    preset = ms.get_preset(models.preset_for("efficientnet-lite0"))
    be = ms.load_backend("torch", model=net, preset=preset)
    chosen = photos(args.images)
    size = 224 if args.full else SIZE
    x = preset.apply([img for _, img in chosen], size=(size, size))
    target = be.predict(x).argmax(axis=1)
    labels = models.imagenet_labels()
    print(f"{len(chosen)} photos at {size} x {size}: " + ", ".join(f"{n} ({labels[t]})" for (n, _), t in zip(chosen, target)), file=sys.stderr)
    maps, seconds = {}, {}
    for name, method in ms.METHODS.items():
        start = time.perf_counter()
        maps[name] = method(be, x, target=target, **method_options(name, args.full))
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    scores = ms.evaluate(be, x, maps, target=target, baselines=True, progress=True,
                         method_options={name: method_options(name, args.full) for name in ms.METHODS},
                         **({} if args.full else METRIC_OPTIONS))
    print(f"metrics: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    settings = "defaults" if args.full else f"methods {METHOD_OPTIONS}, CAM layer {CAM_LAYER}, metrics {METRIC_OPTIONS}"
    print(f"EfficientNet-Lite0 at {size} x {size}, {len(chosen)} photos ({', '.join(n for n, _ in chosen)}), each for its top class; "
          f"mean ± std over the photos, * best mean per column, (+)/(-) higher/lower is better; {settings}")
    print(table(scores, list(ms.METRICS)))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"photos": [n for n, _ in chosen], "target": target.tolist(), "seconds": seconds,
                               "scores": {n: {m: v.tolist() for m, v in row.items()} for n, row in scores.items()}},
                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
