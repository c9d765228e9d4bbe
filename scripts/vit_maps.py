#!/usr/bin/env python
"""The README's figure of a vision transformer's maps: Grad-CAM at the default layer (the input of
the last block's first norm), attention rollout and transformer attribution (Chefer et al. 2021),
on scikit-image's chelsea photo, written to docs/vit_maps.png.

The model is timm's vit_tiny_patch16_224 with random weights (seeded): this project installs no
pretrained ViT weights and nothing may download any, so the maps show what each method computes
on this network, not where a trained ViT looks. Give --weights a state dict of timm's
vit_tiny_patch16_224 (torch.save of its state_dict()) to draw a trained one's.

    python scripts/vit_maps.py [--out docs/vit_maps.png] [--weights FILE]
"""
import argparse
from pathlib import Path

import numpy as np
import skimage.data
import timm
import torch
from PIL import Image

import multisal as ms
from multisal.app.render import grid, overlay

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "vit_maps.png"), help="the PNG to write")
    parser.add_argument("--weights", help="a torch state dict of timm's vit_tiny_patch16_224 (default: random weights)")
    parser.add_argument("--cell", type=int, default=200, help="pixels a side of each picture (default 200)")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    if args.weights:
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    pre = ms.get_preset("torchvision-imagenet")
    be = ms.load_backend("torch", model=net.eval(), preset=pre)
    photo = skimage.data.chelsea()
    x = pre.apply([photo], size=(224, 224))
    target = int(be.predict(x).argmax())
    maps = {
        f"Grad-CAM ({be.default_layer(x.shape[1:])})": ms.gradcam(be, x, target=target),
        "attention rollout": ms.attention_rollout(be, x),
        "transformer attribution": ms.transformer_attribution(be, x, target=target),
    }
    rgb = pre.invert(x)[0]
    columns = [("photo", rgb)] + [(title, overlay(rgb, m[0])) for title, m in maps.items()]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A palette of 256 colours: a far smaller file, and no visible difference at this size.
    Image.fromarray(grid(columns, cell=args.cell)).quantize(colors=256).save(path, optimize=True)
    print(f"wrote {path} (class {target}, {'weights ' + args.weights if args.weights else 'random weights'})")


if __name__ == "__main__":
    main()
