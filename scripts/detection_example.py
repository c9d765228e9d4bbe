"""Draw the README's detection example (docs/detection.png).

nudenet's YOLOv8 export (320n.onnx, shipped inside the nudenet package: 18 classes, output
(N, 4 + 18, 2100)) on scikit-image's astronaut photo at 320x320. The box is the model's own best
FACE_FEMALE detection; the maps explain the sum of that class's score over the anchors whose
decoded box overlaps it by an IoU of at least 0.5: SmoothGrad, and Grad-CAM on the neck's output
at stride 16 (the scale of the anchors that hold the face), with the box drawn on each.

    python scripts/detection_example.py [--out docs/detection.png]
"""
import argparse
import importlib.util
import os

import cv2
import numpy as np
from PIL import Image
from skimage import data

import multisal as ms
from multisal.app.render import grid, overlay

FACE_FEMALE = 1
LAYER = "/model.18/cv2/act/Mul_output_0"   # the neck's stride-16 output (128, 20, 20) at 320x320
SIZE = 320


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/detection.png")
    args = parser.parse_args()
    model = os.path.join(importlib.util.find_spec("nudenet").submodule_search_locations[0], "320n.onnx")
    be = ms.load_backend("onnx", model=model)
    photo = data.astronaut()
    x = ms.get_preset("raw").apply(photo, size=(SIZE, SIZE))        # RGB / 255, as YOLO takes it
    out = be.predict(x)[0]
    anchor = int(out[4 + FACE_FEMALE].argmax())
    cx, cy, w, h = (float(v) for v in out[:4, anchor])
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    target = ms.detections(FACE_FEMALE, box=box, iou=0.5)
    print(f"FACE_FEMALE score {out[4 + FACE_FEMALE, anchor]:.2f}, box {tuple(round(v) for v in box)}")
    maps = {"SmoothGrad": ms.smoothgrad(be, x, target, n=16, seed=0)[0],
            "Grad-CAM": ms.gradcam(be, x, target, layer=LAYER)[0]}
    view = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)

    def boxed(rgb):
        rgb = np.ascontiguousarray(rgb)
        corners = [int(round(v)) for v in box]
        cv2.rectangle(rgb, tuple(corners[:2]), tuple(corners[2:]), (255, 255, 255), 2)
        return rgb

    columns = [("FACE_FEMALE box", boxed(view))] + [(name, boxed(overlay(view, m))) for name, m in maps.items()]
    # 256 colours keep the README's picture small.
    Image.fromarray(grid(columns, cell=200)).quantize(colors=256).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
