#!/usr/bin/env python
"""Reproduce the figure of the Chainer SmoothGrad write-up (seed document 001).

The photo is resized to 224x224 by Pillow, turned BGR and mean-subtracted (preset "chainer-vgg16");
noise of sigma = 0.2 * 255 = 51 is added after the mean subtraction, drawn as np.random.randn after
np.random.seed(SEED) (noise "legacy"); VGG16's softmax output goes through softmax_cross_entropy
against its own argmax, recomputed for every noisy sample (objective "chainer_prob_ce", target
"argmax_per_sample"); the map is the mean over samples of the channel maximum of |gradient|. The
figure shows the photo and the map after 1, 2, 3, 10, 20, 30, 50, 75 and 100 samples, in grey.

All checkpoints come from one pass over the samples: the noise stream is cut into the chunks
between checkpoints, each chunk goes through ms.smoothgrad as an explicit noise array, and a
running sum gives the mean at every checkpoint.

Weights: VGG_ILSVRC_16_layers.npz, the file chainer.links.VGG16Layers converts from the Caffe
model VGG_ILSVRC_16_layers.caffemodel of the Oxford VGG group (Chainer keeps it under
~/.chainer/dataset/pfnet/chainer/models/VGG_ILSVRC_16_layers.npz after its first
VGG16Layers(); VGG16Layers.convert_caffemodel_to_npz(caffemodel, npz) makes it from the Caffe
file). Nothing is downloaded: the file must be there.

Backends: "chainer" (the legacy environment, .venv-legacy: VGG16Layers itself), "torch"
(multisal.models.load("vgg16-chainer", weights=...)) or "onnx" (that model exported to ONNX and
cached, see multisal.backends.onnx.model.exported_model).

    python scripts/reproduce_chainer_smoothgrad.py cheetah.png --weights VGG_ILSVRC_16_layers.npz
    .venv-legacy/bin/python scripts/reproduce_chainer_smoothgrad.py cheetah.png \\
        --weights ~/.chainer/dataset/pfnet/chainer/models/VGG_ILSVRC_16_layers.npz --backend chainer
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

CHECKPOINTS = (1, 2, 3, 10, 20, 30, 50, 75, 100)
NOISE_LEVEL = 0.2        # the write-up's 20 %: sigma = 0.2 * 255 under the chainer-vgg16 preset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + ".",
        epilog="Weights: the .npz that chainer.links.VGG16Layers converts from the Caffe model "
               "VGG_ILSVRC_16_layers.caffemodel (Oxford VGG group), usually "
               "~/.chainer/dataset/pfnet/chainer/models/VGG_ILSVRC_16_layers.npz once Chainer has made it; "
               "VGG16Layers.convert_caffemodel_to_npz(caffemodel, npz) converts it by hand. "
               "Nothing is downloaded. The chainer backend needs the legacy environment (.venv-legacy).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="the photo (any format Pillow reads)")
    parser.add_argument("--weights", required=True,
                        help="VGG_ILSVRC_16_layers.npz (Chainer's conversion of the Caffe VGG16 model)")
    parser.add_argument("--backend", choices=("chainer", "torch", "onnx"), default="torch",
                        help="framework computing the gradients (default: torch)")
    parser.add_argument("--out", default="chainer_smoothgrad.png", help="figure to write (PNG)")
    parser.add_argument("--samples", type=int, default=100, help="number of noisy samples (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="np.random.seed of the write-up's noise (default: 0)")
    parser.add_argument("--resample", default="nearest",
                        help="Pillow filter of the resize to 224x224: nearest (Pillow's default in 2017, the "
                             "default here), bilinear, bicubic (Pillow's default since 7.0), lanczos, box, hamming")
    parser.add_argument("--noise-level", type=float, default=NOISE_LEVEL,
                        help="sigma relative to the 0-255 range (default: 0.2, sigma 51)")
    parser.add_argument("--device", default="cpu", help="torch device, or chainer device for --backend chainer")
    parser.add_argument("--save-maps", metavar="NPZ", help="also save the maps at every checkpoint (.npz)")
    return parser.parse_args(argv)


def load_backend(name, weights, device, preset):
    import multisal as ms
    from multisal import models

    if not os.path.isfile(weights):
        raise ms.MultisalError(f"VGG16 weights file not found: {weights!r} (see --help for where it comes from)")
    if name == "chainer":
        try:
            from chainer.links import VGG16Layers
        except ImportError:
            raise ms.MissingFrameworkError("--backend chainer needs chainer 7.8.1 with numpy<2: run this "
                                           "script with .venv-legacy/bin/python (make test builds it)") from None
        # A path as pretrained_model loads that file and never downloads (only 'auto' does).
        return ms.load_backend("chainer", model=VGG16Layers(pretrained_model=weights), device=device, preset=preset)
    if name == "torch":
        return ms.load_backend("torch", model=models.load("vgg16-chainer", weights=weights), device=device,
                               preset=preset)
    return ms.load_backend("onnx", model=str(exported_model("vgg16-chainer", weights=weights)), preset=preset)


def checkpoint_maps(be, x, samples, sigma, seed, checkpoints=CHECKPOINTS, progress=True):
    """{k: map after the first k samples} for every checkpoint k <= samples (and k = samples),
    from one pass over the legacy noise stream of np.random.seed(seed)."""
    import multisal as ms

    marks = sorted({k for k in checkpoints if k <= samples} | {samples})
    rng = np.random.RandomState(seed)          # noise "legacy": randn(1,C,H,W) per sample, in order
    total = np.zeros(x.shape[2:], np.float64)
    done, maps = 0, {}
    for mark in marks:
        k = mark - done
        noise = sigma * np.concatenate([rng.randn(1, *x.shape[1:]) for _ in range(k)])
        chunk = ms.smoothgrad(be, x, target="argmax_per_sample", objective="chainer_prob_ce", noise=noise,
                              channel_reduce="max")[0]
        total += chunk.astype(np.float64) * k
        done = mark
        maps[mark] = (total / done).astype(np.float32)
        if progress:
            print(f"  {done}/{samples} samples", file=sys.stderr, flush=True)
    return maps


def main(argv=None):
    args = parse_args(argv)
    import multisal as ms
    from multisal import render

    try:
        if args.samples < 1:
            raise ms.MultisalError(f"--samples {args.samples}: need at least 1")
        preset = ms.get_preset("chainer-vgg16", resample=args.resample)
        x = preset.apply(args.image, size=(224, 224))
        sigma = args.noise_level * (preset.value_range[1] - preset.value_range[0])
        be = load_backend(args.backend, os.path.expanduser(args.weights), args.device, preset)
        start = time.perf_counter()
        label = int(be.predict(x).argmax(1)[0])
        print(f"{args.backend}: clean image -> class {label}; {args.samples} samples, sigma {sigma:g}, "
              f"seed {args.seed}", file=sys.stderr)
        maps = checkpoint_maps(be, x, args.samples, sigma, args.seed)
    except ms.MultisalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    columns = [("photo", preset.invert(x)[0])]
    columns += [(f"{k} sample{'s' if k > 1 else ''}", render.grey(m)) for k, m in maps.items()]
    render.save_png(args.out, render.grid(columns))
    if args.save_maps:
        np.savez(args.save_maps, **{f"samples_{k}": m for k, m in maps.items()})
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
