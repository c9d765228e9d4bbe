"""The explain job: a configuration, a list of images, one output folder.

    run = ms.run_explain({"model": "efficientnet-lite0", "inputs": ["skimage:chelsea"], "output": "out/x"})

Set-up (backend, method options, CAM layer, class names, target) happens once, in Job; then
Job.explain_one(source, folder) explains one image into its own folder and returns its manifest
record, never raising for a bad input: an unreadable image is that input's failure, and the other
inputs go on; explain_batch does the same for several images at once, running each method once
over all of them. Runs over many images (explain, batch, resuming, engines) are multisal.batch.

Output (README, "Command line"): config.toml, manifest.jsonl, index.html and one folder per
input with <method>.npy (the raw map), <method>.png (overlay) and grid.png, plus input.png (the
photo the overlays are drawn on) and, with progression, progression.png and progression.npy.
"""
from __future__ import annotations

import difflib
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np

from .. import models
from ..backend import closest_names
from ..errors import MultisalError
from ..files import DEFAULT_TAG, read_text
from ..frameworks import lazy_import
from ..methods import FORWARD_ONLY, METHODS
from ..methods.smoothgrad import smoothgrad
from ..methods.vanilla import gradient_map
from ..noise import average_over_noise
from ..objectives import ARGMAX_PER_SAMPLE, Detections, NumpyOps, detection_terms, detections
from .config import LAYER_KEYS, ConfigError, method_options
from .inputs import read_image
from .loading import build_backend
from .render import grey, grid, overlay, save_npy, save_png

cv2 = lazy_import("cv2")

# The Chainer write-up's SmoothGrad figure: the map after this many samples.
PROGRESSION = (1, 2, 3, 10, 20, 30, 50, 75, 100)
VIEW_SIZE = 448   # longest side of the photo the overlays are drawn on


# ---- the job --------------------------------------------------------------------------------------
class Job:
    """A configured explainer: backend, methods and their options, CAM layer, class names, target.

    `config` is a validated configuration (multisal.config.load_config); the set-up raises
    ConfigError or MultisalError, in one line, when it cannot run. Then explain_one per image.
    """

    def __init__(self, config, progress=False, temp_tag=DEFAULT_TAG):
        self.config = config
        self.progress = progress
        self.temp_tag = temp_tag   # the run's tag on temporary files (multisal.app.output)
        self.backend = build_backend(config)
        self.preset = self.backend.preset
        self.methods = {name: method_options(config, name) for name in config["methods"]}
        shape = (3, *config["size"])
        detection = detection_target(config["target"], shape)
        layers = self._set_layers(shape)
        n_classes = self._check_model(shape, layers, detection)
        self.labels = class_names(config.get("labels"), n_classes)
        self.target = detection or resolve_target(config["target"], self.labels)

    def _set_layers(self, shape):
        """Give every CAM method its layer (its table's, else the top-level one, else the backend's
        default) and its layout keys (its table's, else the top-level ones), and return {method:
        the config key its layer came from}, checking the model has each layer."""
        cam = [m for m in self.methods if "layer" in inspect.signature(METHODS[m]).parameters]
        if cam:
            layer = self.config.get("layer") or self.backend.default_layer(shape)
            for name in cam:
                self.methods[name].setdefault("layer", layer)
                if "layer" not in self.config.get(name, {}):   # a table's own layer keeps its own layout
                    for key in LAYER_KEYS[1:]:
                        if key in self.config:
                            self.methods[name].setdefault(key, self.config[key])
        keys = {m: (f"{m}.layer" if "layer" in self.config.get(m, {}) else "layer")
                for m, o in self.methods.items() if "layer" in o}
        known = self.backend.layer_names()
        for method, key in keys.items():
            layer = self.methods[method]["layer"]
            if layer not in known:
                close = closest_names(layer, known)
                hint = f"closest: {', '.join(close)}; " if close else ""
                raise ConfigError(f"config key {key!r}: expected a layer of the model ({hint}`multisal layers` "
                                  f"lists them), got {json.dumps(layer)}")
        return keys

    def _check_model(self, shape, layers, detection=None) -> int:
        """Run the model on a blank input before any output is written; return its number of classes.

        A forward pass: the model runs at this size, the CAM layers give feature maps (NCHW, NHWC or
        tokens on a grid, as recognised or as their layout keys say), the output is (N, classes), or
        YOLO-style for a detection target. A backward pass, unless every method runs forward passes
        only: the model is differentiable here (for ONNX: every op has a gradient rule), and one-off
        kernel set-up is not billed to the first image's first method.
        """
        blank = np.zeros((1, *shape), np.float32)
        probe = self.backend.run(blank, layers=sorted({self.methods[m]["layer"] for m in layers}))
        for method, key in layers.items():
            options = self.methods[method]
            layer = options["layer"]
            overrides = [options.get(k) for k in LAYER_KEYS[1:]]
            activation = probe.activations[layer].shape
            try:
                self.backend.layer_layout(layer, activation, shape, *overrides)
            except MultisalError as err:
                given = [k for k, v in zip(LAYER_KEYS[1:], overrides) if v is not None]
                if given:   # the key that said how to read the layer is the one at fault
                    table = self.config.get(method, {})
                    owner = f"{method}.{given[0]}" if given[0] in table else given[0]
                    raise ConfigError(f"config key {owner!r}: {err}") from None
                raise ConfigError(f"config key {key!r}: expected a layer with a 4-D (N,C,H,W) activation, got "
                                  f"{json.dumps(layer)} of shape {activation}; (N,H,W,C) and tokens (N,T,C) on a "
                                  "grid of the input work too, and the key 'layout' says which") from None
        if detection is not None:
            axis, objectness = detection.decoding(probe.outputs.shape)
            n_classes = probe.outputs.shape[axis] - (5 if objectness else 4)
        elif probe.outputs.ndim != 2:
            raise MultisalError(f"explain needs a classifier (output (N, classes)) or a detection target; "
                                f"{self.config['model']!r} gives shape {probe.outputs.shape}")
        else:
            n_classes = probe.outputs.shape[1]
        if self.config["progression"] or any(name not in FORWARD_ONLY for name in self.methods):
            self.backend.run(blank, "logit", np.zeros(1, np.int64) if detection is None else detection, input_grad=True)
        return n_classes

    def explain_one(self, source, folder) -> dict:
        """Explain one image into `folder`; its manifest record (status "failed" with the reason when
        the image cannot be read or a method fails)."""
        return self.explain_batch([(source, folder)])[0]

    def explain_batch(self, items, data=None) -> list:
        """Explain several images at once: each method runs once over all the readable ones (the
        backend splits the work by its memory budget), and each image gets its own folder and
        record, in the order of `items` ((source, folder) pairs). `data` may hold the bytes already
        read for a source (the ray engine reads files apart from the workers). An image that
        cannot be read is its own failure; when a method fails on the stack, each image is tried
        alone, so that one bad image fails only itself."""
        records, ready = [], []
        for source, folder in items:
            folder = Path(folder)
            record = {"input": str(source), "status": "failed", "error": None, "folder": folder.name,
                      "target": None, "label": None, "backend": self.backend.name, "methods": {}}
            records.append(record)
            try:
                photo = read_image(str(source), (data or {}).get(source))
                ready.append((record, folder, photo, self.preset.apply(photo)))
            except Exception as err:   # this input's failure; the others go on
                record["error"] = _one_line(err)
        if len(ready) > 1:
            try:
                self._explain_stack(ready)
                return records
            except Exception:
                pass   # tried one by one below, to find whose failure it is
        for item in ready:
            try:
                self._explain_stack([item])
            except Exception as err:
                item[0]["error"] = _one_line(err)
        return records

    def _explain_stack(self, ready):
        """Run every method once on the stacked images of `ready` ([(record, folder, photo, x)])
        and write each image's files; a method's seconds are shared out evenly between images."""
        x = np.concatenate([item[3] for item in ready])
        outputs = self.backend.predict(x)
        views, columns, targets = [], [], []
        for i, (record, folder, photo, _) in enumerate(ready):
            if isinstance(self.target, Detections):
                target = self.target.channel
                record.update(target=target, label=self.labels[target], **detection_record(outputs[i:i + 1], self.target),
                              methods={})
            else:
                p = probabilities(outputs[i])
                top = [int(c) for c in np.argsort(-p, kind="stable")[:5]]
                # The class explained (on the clean image) and what the methods are given: the same,
                # except that "argmax_per_sample" lets noisy samples pick their own top class.
                target = self.target if isinstance(self.target, int) else top[0]
                record.update(target=target, label=self.labels[target], probability=float(p[target]),
                              top5=[{"class": c, "label": self.labels[c], "probability": float(p[c])} for c in top],
                              methods={})
            targets.append(target)
            view = _fit(photo, VIEW_SIZE)
            save_png(folder / "input.png", view, self.temp_tag)
            record["photo"] = "input.png"
            views.append(view)
            columns.append([(f"{target} {self.labels[target]}", view)])
        given = self.target if isinstance(self.target, (str, Detections)) else np.array(targets, np.int64)
        for name, options in self.methods.items():
            method = METHODS[name]
            accepts = inspect.signature(method).parameters
            stats = {}
            extra = {"progress": self.progress, "stats": stats}
            options = dict(options, **{k: v for k, v in extra.items() if k in accepts})
            start = time.perf_counter()
            try:
                maps = method(self.backend, x, target=given, **options)
            except Exception as err:
                raise MultisalError(f"{name}: {_one_line(err)}") from None
            seconds = round((time.perf_counter() - start) / len(ready), 4)
            for i, (record, folder, _, _) in enumerate(ready):
                entry = {"seconds": seconds, "files": [f"{name}.npy", f"{name}.png"]}
                if "layer" in options:
                    entry["layer"] = options["layer"]
                if "samples" in stats:   # what SmoothGrad used: n, or where n = "auto" settled
                    entry["samples"] = int(stats["samples"][i])
                save_npy(folder / f"{name}.npy", maps[i], self.temp_tag)
                picture, view = overlay(views[i], maps[i], name)
                entry["view"] = view.record()
                save_png(folder / f"{name}.png", picture, self.temp_tag)
                record["methods"][name] = entry
                columns[i].append((name, picture, view))
        for i, (record, folder, *_) in enumerate(ready):
            save_png(folder / "grid.png", grid(columns[i]), self.temp_tag)
            record["grid"] = "grid.png"
            if self.config["progression"]:
                self._progression(record, folder, x[i:i + 1], targets[i] if isinstance(given, np.ndarray) else given,
                                  views[i])
        for record, *_ in ready:
            record["status"] = "ok"

    def _progression(self, record, folder, x, given, view):
        start = time.perf_counter()
        maps = smoothgrad_progression(self.backend, x, given, method_options(self.config, "smoothgrad"),
                                      progress=self.progress)
        save_npy(folder / "progression.npy", maps, self.temp_tag)
        save_png(folder / "progression.png",
                 grid([("input", view)] + [(f"{k} sample{'s' if k > 1 else ''}", grey(m))
                                              for k, m in zip(PROGRESSION, maps)]), self.temp_tag)
        record["progression"] = {"seconds": round(time.perf_counter() - start, 4), "samples": list(PROGRESSION),
                                 "files": ["progression.npy", "progression.png"]}


def smoothgrad_progression(be, x, target, options=None, checkpoints=PROGRESSION, progress=False):
    """SmoothGrad of one image after each number of samples in `checkpoints`, from one pass of
    max(checkpoints) samples: the running mean of the per-sample maps over the noise stream
    ms.smoothgrad draws (samples numbered in order), so the map after k samples is
    ms.smoothgrad(n=k) with the same options. `options` are smoothgrad's keywords (n, tol and
    max_n are ignored); target is a class index, "argmax_per_sample" or Detections."""
    defaults = {k: p.default for k, p in inspect.signature(smoothgrad).parameters.items()
                if p.default is not inspect.Parameter.empty}
    o = {**defaults, **(options or {})}
    given = target if target == ARGMAX_PER_SAMPLE or isinstance(target, Detections) else int(target)

    def per_sample(noisy, _images):
        sample_target = given if isinstance(given, (str, Detections)) else np.full(len(noisy), given, np.int64)
        return gradient_map(be, noisy, sample_target, o["objective"], o["channel_reduce"], o["abs"], o["square"])

    maps = average_over_noise(per_sample, be, x[:1], noise_level=o["noise_level"], sigma=o["sigma"], noise=o["noise"],
                              seed=o["seed"], batch_size=o["batch_size"], progress=progress, desc="progression",
                              checkpoints=checkpoints)
    return maps.astype(np.float32)


def class_names(labels_file, n_classes):
    """Names of the model's classes: a labels file, ImageNet's for 1000 classes, else "class i"."""
    if labels_file:
        try:
            text = read_text(os.path.expanduser(labels_file), "labels file")
        except MultisalError as err:
            raise ConfigError(f"config key 'labels': {err}") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(names) != n_classes:
            raise ConfigError(f"config key 'labels': {labels_file!r} has {len(names)} class names, "
                              f"expected one per class of the model ({n_classes})")
        return names
    if n_classes == 1000:
        return models.imagenet_labels()
    return [f"class {i}" for i in range(n_classes)]


def detection_target(target, shape):
    """Detections for a configuration's `target = {detection = {...}}` (its box checked against
    the input of `shape`, (C, H, W)), else None."""
    if not isinstance(target, dict):
        return None
    t = target["detection"]
    detection = detections(t["class"], box=t["box"], iou=t.get("iou", 0.5), format=t.get("format", "yolov8"),
                           axis=t.get("axis"))
    try:
        detection.check_input((1, *shape))
    except MultisalError as err:
        raise ConfigError(f"config key 'target.detection.box': {err}") from None
    return detection


def detection_record(output, target):
    """A manifest record's fields for a detection target on one image's output: the class's
    highest score among the anchors in the box (its "probability"), no top 5, and the detection:
    box, iou, how many anchors the box holds, and their summed score (what the methods explain)."""
    output = np.asarray(output, np.float64)
    scores, weights = detection_terms(NumpyOps, output, "logit", target.decoding(output.shape), target.box_array(),
                                      target.iou_array(), target.class_weights(output.shape))
    held = np.broadcast_to(scores, weights.shape)[weights > 0]
    return {"probability": float(held.max(initial=0.0)), "top5": [],
            "detection": {"box": list(target.box), "iou": target.iou, "format": target.format,
                          "anchors": int(held.size), "score": float(held.sum())}}


def resolve_target(target, labels):
    """None for "auto" (each image's top class), "argmax_per_sample", or the class index of an index
    or a class name."""
    if target == "auto":
        return None
    if target == ARGMAX_PER_SAMPLE:
        return target
    if isinstance(target, int):
        if target >= len(labels):
            raise ConfigError(f"config key 'target': expected a class index 0..{len(labels) - 1} or a class name, "
                              f"got {target}")
        return target
    folded = [name.lower() for name in labels]
    if target.lower() in folded:
        return folded.index(target.lower())
    close = difflib.get_close_matches(target.lower(), folded, n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(json.dumps(labels[folded.index(c)]) for c in close)}" if close else ""
    raise ConfigError(f'config key \'target\': expected "auto", "argmax_per_sample", a class index or one of '
                      f"the model's class names, got {json.dumps(target)}{hint}")


def probabilities(scores) -> np.ndarray:
    """Class probabilities of one output: softmax of logits, or the output itself when it already
    is a distribution (a model ending in softmax)."""
    s = np.asarray(scores, np.float64).ravel()
    if s.min() >= 0 and abs(s.sum() - 1) < 1e-3:
        return s
    e = np.exp(s - s.max())
    return e / e.sum()


def _fit(photo, longest):
    h, w = photo.shape[:2]
    scale = longest / max(h, w)
    if scale >= 1:
        return photo
    return cv2.resize(photo, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _one_line(err) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, MultisalError) else f"{type(err).__name__}: {text}"
