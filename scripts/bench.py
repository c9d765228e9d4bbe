#!/usr/bin/env python
"""Speed of multisal against the reference libraries on the same work, in one run, as ratios.

Sections (--sections, default all) are registered in SECTIONS; each prints its own tables and
returns what goes under its name in the JSON record (--json). A new section is one function
decorated with @section("name").

"compare": methods x backends x reference libraries, on the CPU at 224x224, one real
photo (scikit-image's chelsea) preprocessed with the model's preset, the model's argmax class as
target, for EfficientNet-Lite0 (real ImageNet weights) and ResNet-50 (random weights, seeded).
multisal runs on the torch backend and on the onnx backend (the model exported to ONNX). Each
reference does the same work as a multisal call given the keywords that make the same output:

    work (--works)         multisal keywords                   reference
    vanilla_gradient       channel_reduce=None                 Captum Saliency
    smoothgrad             n, sigma, channel_reduce=None       Captum NoiseTunnel(Saliency), smoothgrad;
                                                               a plain torch loop
    integrated_gradients   steps=n, method="riemann_right"     Captum IntegratedGradients(n_steps=n),
                                                               the same method (Captum's default differs)
    gradcam                upsample=False, normalize=False     Captum LayerGradCam (raw, layer resolution)
                           (defaults)                          pytorch-grad-cam GradCAM (upsampled, [0,1])
    gradcam_pp             eps=1e-6                            pytorch-grad-cam GradCAMPlusPlus (its eps)
    smooth_gradcam_pp      n, sigma, upsample=False            torch-cam SmoothGradCAMpp(num_samples=n, std=sigma)

n is --n (50), sigma = 0.15 x the preset's value range. The CAM layer is the torch backend's default
layer (the onnx backend resolves its default to the same tensor); the references hook the module
of that name, except where that module runs more than once per forward (MODELS' reference_layer).
torch-cam's SmoothGradCAMpp is not the same formula (its alpha divides by sum_ab(A g^3), not
sum_ab(A) g^3, and its weights take relu of the last noisy sample's gradient, not of the mean), but
the same work: the clean forward pass, then n noisy ones, each differentiated down to the layer
(torch-cam takes the noisy samples one at a time; it has no batch size).

The references are used at their best: their own copy of the model in eval mode with its
parameters frozen and in the torch backend's memory layout (channels_last on the CPU), as multisal
runs it (--plain-references: the model as loaded instead); every reference with a batch size
(NoiseTunnel's nt_samples_batch_size, IntegratedGradients' internal_batch_size, the plain loop's)
at its fastest of BATCH_SIZES and "all at once"; torch-cam's clean pass under no_grad; the
pytorch-grad-cam and torch-cam extractors opened and closed within each call, so that no hook is
left on the model (checked after every work).

"batch": `multisal batch` (EfficientNet-Lite0; vanilla gradient, Grad-CAM++, SmoothGrad n=10) over
--batch-images distinct photos (crops of scikit-image's) on each engine, in a child process: images
per second, wall time including set-up (on ray: starting a local cluster of this machine's CPUs and
one actor per CPU); then the local engine's peak RSS on jobs of --memory-images images (issue 6
aims at the largest within 10% of the smallest).

"int8": SmoothGrad and Grad-CAM++ on an int8 (QDQ) EfficientNet-Lite0 against its float32 model,
both on the onnx backend on the CPU: time ratios and the maps' correlation.

"adaptive": SmoothGrad n="auto" on the scikit-image photos with EfficientNet-Lite0: the samples it
used, how far its map is from n=100's (the same noise stream, so the first k samples are shared),
and the fewest samples after which the running mean stays within the tolerance of n=100's map.

"precision": SmoothGrad n=50 and Grad-CAM++ on reduced-precision versions of EfficientNet-Lite0
(PRECISIONS: onnxconverter-common's float16 conversion) against its float32 export, all on the
onnx backend, on the CPU and, where onnxruntime has its CUDA provider, on CUDA too (it says when
there is none): seconds as ratios to float32's from one run, and each map's correlation with the
float32 model's.

Timings are the best of --repeats rounds, the cases of a work interleaved round by round; fewer
rounds where they would pass --budget seconds. "corr" is the Pearson correlation of a reference's
output with multisal's torch backend's, "corr onnx" that of the onnx backend's with the torch
backend's: a guard against timing different work. Where noise is drawn (each library draws its
own), "self" is multisal's correlation with itself under another seed: what the same work reaches.
Timings belong here, never in the tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import multisal as ms
from multisal import models
from multisal.app.demo import demo_photos
from multisal.evaluation import causal, road, sanity, sparsity

BATCH_SIZES = (1, 5, 10, 25, 50)
NOISE_LEVEL = 0.15          # SmoothGrad's and Smooth Grad-CAM++'s sigma, relative to the preset's value range
BACKENDS = ("torch", "onnx")

# ---- timing ---------------------------------------------------------------------------------------


def best_times(cases, repeats, budget=math.inf, warm=()):
    """Best-of seconds per case and each case's last output. The cases are interleaved round by
    round so that drift in the machine's speed (other load, clocks) falls on all of them alike.
    Each case not in `warm` is called once untimed first (first-call allocations, thread pools,
    gradient graphs). Rounds stop at `repeats`, or where another would pass `budget` seconds in all
    (at least one round)."""
    outputs = {name: fn() for name, fn in cases.items() if name not in warm}
    best = {name: math.inf for name in cases}
    spent = 0.0
    for done in range(1, repeats + 1):
        round_start = time.perf_counter()
        for name, fn in cases.items():
            start = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
        spent += time.perf_counter() - round_start
        if spent * (done + 1) / done > budget:
            break
    return best, outputs


def fastest_batch(make, n):
    """A reference's fastest batch size for work of n samples: make(batch, samples) is its call.
    Each candidate (BATCH_SIZES below n, and n: all at once) runs twice, the faster run kept, on about
    n/5 samples (whole batches; at least 2 samples, as Captum's Riemann sums need 2 steps) rather than
    all n, so that the search costs about four runs of the work instead of two per candidate.
    Returns (batch, {batch: seconds per sample})."""
    per_sample = {}
    for b in sorted({b for b in BATCH_SIZES if b < n} | {n}):
        samples = b * math.ceil(max(2, n / 5) / b)
        seconds, _ = best_times({b: make(b, samples)}, repeats=2, warm={b})
        per_sample[b] = seconds[b] / samples
    return min(per_sample, key=per_sample.get), per_sample


def correlation(a, b):
    a, b = as_array(a).ravel(), as_array(b).ravel()
    if a.size != b.size:
        raise ValueError(f"maps of {a.size} and {b.size} values: the pairing compares different work")
    return float(np.corrcoef(a, b)[0, 1])


def as_array(out):
    """A map as float64 numpy, from numpy, a torch tensor or torch-cam's list of tensors (one per layer)."""
    if isinstance(out, list):
        out = out[0]
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=np.float64)


# ---- models ---------------------------------------------------------------------------------------


def _efficientnet_lite0():
    return models.load("efficientnet-lite0")


def _resnet50():
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@dataclass
class ModelSpec:
    build: Callable[[], torch.nn.Module]   # a fresh module in eval mode, the same weights every call
    preset: str
    # The module the references hook, where the torch backend's default layer runs more than once per
    # forward: ResNet's Bottleneck calls its one ReLU module three times, and pytorch-grad-cam would
    # record the first call (512 channels, after bn1); the block returns the tensor multisal captures.
    reference_layer: Optional[str] = None


MODELS = {
    "efficientnet-lite0": ModelSpec(_efficientnet_lite0, "efficientnet-lite"),
    "resnet50": ModelSpec(_resnet50, "torchvision-imagenet", reference_layer="layer4.2"),
}


@dataclass
class Setup:
    """One model, its input and everything a work needs, built once per model."""
    name: str
    x: np.ndarray                      # (1,3,224,224) in model space
    target: int
    sigma: float
    n: int
    backends: dict                     # "torch" / "onnx" -> multisal backend
    layers: dict                       # backend name -> its name of the CAM layer
    ref: torch.nn.Module               # the references' own copy of the model
    ref_layer: str
    frozen: bool                       # the references' parameters are frozen
    xt: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.xt = torch.from_numpy(self.x)

    @property
    def ref_module(self):
        return self.ref.get_submodule(self.ref_layer)

    def grad_input(self):
        """The input for libraries that differentiate from wherever the graph starts (pytorch-grad-cam):
        with frozen parameters the graph must start at the input."""
        return self.xt.clone().requires_grad_(self.frozen)


def export_onnx(net, path):
    """The module exported with torch's dynamo exporter and a free batch axis (as the onnx backend exports models/ names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=True, input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False)
    return path


def build_setup(name, n, plain_references, tmp):
    spec = MODELS[name]
    preset = ms.get_preset(spec.preset)
    x = preset.apply(demo_photos()["chelsea"], size=(224, 224))
    bt = ms.load_backend("torch", model=spec.build(), preset=preset)
    bo = ms.load_backend("onnx", model=str(export_onnx(spec.build(), Path(tmp) / f"{name}.onnx")),
                         cache_dir=tmp, preset=preset)
    ref = spec.build()
    if not plain_references:
        ref.requires_grad_(False)
        if bt.channels_last:
            ref.to(memory_format=torch.channels_last)
    lo, hi = preset.value_range
    layer = bt.default_layer(x.shape[1:])
    return Setup(name=name, x=x, target=int(bt.predict(x).argmax()), sigma=NOISE_LEVEL * (hi - lo), n=n,
                 backends={"torch": bt, "onnx": bo}, layers={"torch": layer, "onnx": bo.default_layer(x.shape[1:])},
                 ref=ref, ref_layer=spec.reference_layer or layer, frozen=not plain_references)


def check_no_hooks(net):
    """Fail if a reference library left a hook on the model (it would slow every later case)."""
    hooked = [name or "<model>" for name, m in net.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]
    if hooked:
        raise RuntimeError(f"hooks left on {', '.join(hooked[:5])}")


# ---- works: what each reference does, and the multisal call that does the same ---------------------


@dataclass
class Pairing:
    reference: str                     # label, with the batch size where one was tuned
    run: Callable[[], object]          # the reference's call for the whole work; returns its map
    multisal: dict                     # keywords of the multisal call doing the same work
    aim: float = 1.0                   # multisal / reference at most this
    tuning: Optional[dict] = None      # {batch: seconds per sample} where the batch size was tuned


@dataclass
class Work:
    title: str
    method: Callable
    pairings: list
    cam: bool = False                  # takes a layer (each backend gets its own name for it)
    onnx_aim: Optional[float] = None   # onnx backend / torch backend at most this
    noisy: bool = False                # its result depends on the noise drawn (multisal's `seed`)


def tuned(label, make, n, multisal, aim=1.0):
    """A pairing whose reference runs at its fastest batch size (fastest_batch)."""
    batch, per_sample = fastest_batch(make, n)
    return Pairing(f"{label} (batch {batch})", make(batch, n), multisal, aim=aim, tuning=per_sample)


def plain_loop(net, xt, target, n, sigma, batch):
    """What a careful user writes by hand: batched noisy copies, gradient of the target logit, mean |g|."""
    total = torch.zeros(xt.shape[1:])
    for start in range(0, n, batch):
        k = min(batch, n - start)
        noisy = (xt + sigma * torch.randn(k, *xt.shape[1:])).requires_grad_(True)
        (g,) = torch.autograd.grad(net(noisy)[:, target].sum(), noisy)
        total += g.abs().sum(0)
    return total / n


def vanilla_gradient_work(s):
    from captum.attr import Saliency
    return Work("vanilla gradient", ms.vanilla_gradient, [
        Pairing("captum Saliency", lambda: Saliency(s.ref).attribute(s.xt, target=s.target, abs=True),
                {"channel_reduce": None})])


def smoothgrad_work(s):
    from captum.attr import NoiseTunnel, Saliency
    nt = NoiseTunnel(Saliency(s.ref))
    same = {"n": s.n, "sigma": s.sigma, "channel_reduce": None}
    return Work(f"SmoothGrad n={s.n}", ms.smoothgrad, [
        tuned("captum NoiseTunnel", lambda b, k: lambda: nt.attribute(
            s.xt, nt_type="smoothgrad", nt_samples=k, nt_samples_batch_size=b, stdevs=s.sigma, target=s.target),
            s.n, same),
        tuned("plain torch loop", lambda b, k: lambda: plain_loop(s.ref, s.xt, s.target, k, s.sigma, b),
              s.n, same, aim=1.05),
    ], onnx_aim=0.4, noisy=True)


def integrated_gradients_work(s):
    from captum.attr import IntegratedGradients
    ig = IntegratedGradients(s.ref)
    # Captum's default is Gauss-Legendre; both take the paper's right Riemann sum here.
    return Work(f"Integrated Gradients {s.n} steps", ms.integrated_gradients, [
        tuned("captum IntegratedGradients", lambda b, k: lambda: ig.attribute(
            s.xt, target=s.target, n_steps=k, method="riemann_right", internal_batch_size=b),
            s.n, {"steps": s.n, "method": "riemann_right"})])


def _pytorch_grad_cam(cam_class, s):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    targets = [ClassifierOutputTarget(s.target)]

    def run():
        with cam_class(model=s.ref, target_layers=[s.ref_module]) as cam:
            return cam(input_tensor=s.grad_input(), targets=targets)
    return run


def gradcam_work(s):
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    lgc = LayerGradCam(s.ref, s.ref_module)
    return Work("Grad-CAM", ms.gradcam, [
        Pairing("captum LayerGradCam", lambda: lgc.attribute(s.xt, target=s.target, relu_attributions=True),
                {"upsample": False, "normalize": False}),
        Pairing("pytorch-grad-cam GradCAM", _pytorch_grad_cam(GradCAM, s), {})], cam=True)


def gradcam_pp_work(s):
    from pytorch_grad_cam import GradCAMPlusPlus
    # pytorch-grad-cam adds 1e-6 to alpha's denominator; multisal takes the same eps (same cost).
    return Work("Grad-CAM++", ms.gradcam_pp, [
        Pairing("pytorch-grad-cam GradCAMPlusPlus", _pytorch_grad_cam(GradCAMPlusPlus, s), {"eps": 1e-6})], cam=True)


def smooth_gradcam_pp_work(s):
    from torchcam.methods import SmoothGradCAMpp

    def run():
        with SmoothGradCAMpp(s.ref, s.ref_layer, num_samples=s.n, std=s.sigma, input_shape=s.x.shape[1:]) as cam:
            with torch.no_grad():   # the clean pass gives A only; torch-cam's noisy passes make their own graphs
                s.ref(s.xt)
            return cam(class_idx=s.target)
    # torch-cam's maps are at layer resolution, scaled to [0,1].
    return Work(f"Smooth Grad-CAM++ n={s.n}", ms.smooth_gradcam_pp, [
        Pairing("torch-cam SmoothGradCAMpp", run, {"n": s.n, "sigma": s.sigma, "upsample": False})],
        cam=True, noisy=True)


WORKS = {
    "vanilla_gradient": vanilla_gradient_work,
    "smoothgrad": smoothgrad_work,
    "integrated_gradients": integrated_gradients_work,
    "gradcam": gradcam_work,
    "gradcam_pp": gradcam_pp_work,
    "smooth_gradcam_pp": smooth_gradcam_pp_work,
}


def multisal_label(backend, kwargs):
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("n", "sigma", "steps"))
    return f"multisal {backend}" + (f" ({shown})" if shown else "")


def run_work(s, work, repeats, budget):
    """Time one work's cases side by side; one row per pairing."""
    calls = {}   # label -> (backend, keywords) of each distinct multisal call
    for p in work.pairings:
        for backend in BACKENDS:
            kwargs = {**p.multisal, **({"layer": s.layers[backend]} if work.cam else {})}
            calls[multisal_label(backend, p.multisal)] = (s.backends[backend], kwargs)
    cases = {label: (lambda be=be, kw=kw: work.method(be, s.x, s.target, **kw)) for label, (be, kw) in calls.items()}
    cases.update({p.reference: p.run for p in work.pairings})
    # A tuned reference is warm: its tuning ran it at that batch size.
    seconds, outputs = best_times(cases, repeats, budget,
                                  warm={p.reference for p in work.pairings if p.tuning is not None})
    check_no_hooks(s.ref)
    rows, self_corr = [], {}
    for p in work.pairings:
        mt, mo = (multisal_label(b, p.multisal) for b in BACKENDS)
        ref = seconds[p.reference]
        # Where the noise differs, two runs of the same work correlate only so far: multisal against
        # itself with another seed shows how far, which a reference doing the same work should reach.
        if work.noisy and mt not in self_corr:
            be, kwargs = calls[mt]
            self_corr[mt] = correlation(outputs[mt], work.method(be, s.x, s.target, seed=1, **kwargs))
        rows.append({"reference": p.reference, "multisal": p.multisal, "reference_s": ref,
                     "torch_s": seconds[mt], "onnx_s": seconds[mo],
                     "torch/ref": seconds[mt] / ref, "onnx/ref": seconds[mo] / ref,
                     "onnx/torch": seconds[mo] / seconds[mt], "aim": p.aim, "onnx_aim": work.onnx_aim,
                     "corr": correlation(outputs[mt], outputs[p.reference]), "corr_self": self_corr.get(mt),
                     "corr_onnx": correlation(outputs[mo], outputs[mt])})
    return {"title": work.title, "seconds": seconds, "rows": rows,
            "tuning": {p.reference: p.tuning for p in work.pairings if p.tuning is not None}}


def misses(work):
    """The ratios of a work's rows that miss their aims, as text."""
    found = []
    for row in work["rows"]:
        for key in ("torch/ref", "onnx/ref"):
            if row[key] > row["aim"]:
                found.append(f"{work['title']}: {key} {row['reference']} {row[key]:.3f}x > {row['aim']:.2f}x")
        if row["onnx_aim"] is not None and row["onnx/torch"] > row["onnx_aim"]:
            found.append(f"{work['title']}: onnx/torch {row['onnx/torch']:.3f}x > {row['onnx_aim']:.2f}x")
    return list(dict.fromkeys(found))   # pairings sharing one multisal call share its onnx/torch ratio


def print_table(s, works):
    bt, bo = s.backends["torch"], s.backends["onnx"]
    shape = s.x.shape[1:]
    print(f"\n{s.name} 224x224, target class {s.target}, CAM layer {s.layers['torch']!r} "
          f"(references: {s.ref_layer!r}, onnx: {s.layers['onnx']!r}); multisal batch: torch "
          f"{bt.batch_size(shape)}, onnx {bo.batch_size(shape)}")
    head = (f"  {'work':30s} {'reference':38s} {'ref s':>8s} {'torch s':>8s} {'onnx s':>8s} "
            f"{'torch/ref':>9s} {'onnx/ref':>9s} {'onnx/torch':>10s} {'corr':>6s} {'self':>6s} {'corr onnx':>9s}")
    print(head)
    print("  " + "-" * (len(head) - 2))

    def ratio(value, aim, width):
        return f"{value:.2f}x{'*' if aim is not None and value > aim else ' '}".rjust(width)

    for work in works.values():
        for i, row in enumerate(work["rows"]):
            title = work["title"] if i == 0 else ""
            corr_self = "-" if row["corr_self"] is None else f"{row['corr_self']:.3f}"
            print(f"  {title:30s} {row['reference']:38s} {row['reference_s']:8.3f} {row['torch_s']:8.3f} "
                  f"{row['onnx_s']:8.3f} {ratio(row['torch/ref'], row['aim'], 9)} "
                  f"{ratio(row['onnx/ref'], row['aim'], 9)} {ratio(row['onnx/torch'], row['onnx_aim'], 10)} "
                  f"{row['corr']:6.3f} {corr_self:>6s} {row['corr_onnx']:9.4f}")
    print("  seconds: best of the rounds; ratio < 1: multisal faster; * misses its aim (multisal/reference <= 1.00x,\n"
          "  <= 1.05x the plain loop, SmoothGrad onnx/torch <= 0.40x). corr: the reference's output against multisal\n"
          "  torch's; self: multisal torch's against itself with another seed; corr onnx: onnx against torch backend")


# ---- sections -------------------------------------------------------------------------------------

SECTIONS = {}


def section(name):
    """Register a section: fn(args) prints its results and returns what the JSON record keeps."""
    def register(fn):
        SECTIONS[name] = fn
        return fn
    return register


@section("compare")
def compare(args):
    """Methods x backends x reference libraries on the same work (issue 6)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            start = time.perf_counter()
            s = build_setup(name, args.n, args.plain_references, tmp)
            works = {w: run_work(s, WORKS[w](s), args.repeats, args.budget) for w in args.works}
            print_table(s, works)
            missed = [m for w in works.values() for m in misses(w)]
            for m in missed:
                print(f"  missed: {m}")
            wall = time.perf_counter() - start
            print(f"  ({wall:.0f} s for {name}, export, gradient graphs and batch-size searches included)")
            results[name] = {"target": s.target, "layers": s.layers, "reference_layer": s.ref_layer, "sigma": s.sigma,
                             "batch": {b: be.batch_size(s.x.shape[1:]) for b, be in s.backends.items()},
                             "works": works, "missed": missed, "wall_s": wall}
    return results


# ---- the batch job: images per second per engine, memory as the job grows ---------------------
BATCH_JOB = {"model": "efficientnet-lite0", "methods": ["vanilla_gradient", "gradcam_pp", "smoothgrad"],
             "smoothgrad": {"n": 10}}
# Run in a child process, so that its peak RSS is the job's alone: VmHWM, as Linux carries
# getrusage's ru_maxrss over from the forking parent across exec.
JOB_SCRIPT = """
import json, re, sys
import multisal as ms
run = ms.run_batch(json.loads(sys.argv[1]), progress=False)
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": run.seconds, "failed": len(run.failed), "peak_rss_mib": peak / 1024}))
"""


def photo_set(folder, count, size=256):
    """`count` distinct JPEG photos: random crops of scikit-image's bundled photos."""
    import cv2
    import skimage.data
    folder.mkdir(parents=True, exist_ok=True)
    sources = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(photo[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"photo{i:05d}.jpg"), crop[:, :, ::-1])
    return folder


def run_job(config):
    done = subprocess.run([sys.executable, "-c", JOB_SCRIPT, json.dumps(config)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"batch job failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- adaptive SmoothGrad ---------------------------------------------------------------------
def adaptive_smoothgrad(be, photos, tol=0.05, n_ref=100):
    """Per photo: the samples n="auto" used, and the fewest samples whose map is within `tol` of
    the n=100 map for good (relative L2 of the max-scaled maps; the same noise stream, so the map
    after k samples is smoothgrad(n=k))."""
    from multisal.app.job import smoothgrad_progression
    rows = []
    for name, x in photos.items():
        stats = {}
        auto = ms.smoothgrad(be, x, n="auto", tol=tol, stats=stats)[0]
        target = int(be.predict(x)[0].argmax())   # what target=None explains
        maps = smoothgrad_progression(be, x, target, {}, checkpoints=tuple(range(1, n_ref + 1)))
        scaled = maps / np.abs(maps).reshape(len(maps), -1).max(axis=1)[:, None, None]
        dist = np.linalg.norm((scaled - scaled[-1]).reshape(len(maps), -1), axis=1) / np.linalg.norm(scaled[-1])
        within = int(np.flatnonzero(dist > tol).max() + 2) if (dist > tol).any() else 1
        used = int(stats["samples"][0])
        ref = scaled[-1]
        auto_dist = float(np.linalg.norm(auto / np.abs(auto).max() - ref) / np.linalg.norm(ref))
        rows.append({"photo": name, "auto_samples": used, "auto_vs_n100": round(auto_dist, 4),
                     "samples_to_n100_within_tol": within})
    return rows


@section("batch")
def batch_job(args):
    """Images per second of `multisal batch` per engine, and its peak memory as the job grows."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = photo_set(tmp / "photos", max(args.batch_images, args.memory_images[-1]))
        listing = sorted(str(p) for p in photos.iterdir())
        print(f"\nbatch job: EfficientNet-Lite0 224x224, {', '.join(BATCH_JOB['methods'])} "
              f"(SmoothGrad n={BATCH_JOB['smoothgrad']['n']}), photos {photos}")
        engines = {"local": {"name": "local"},
                   "ray": {"name": "ray", "num_cpus": os.cpu_count(), "cpus_per_actor": 1}}
        print(f"  {'engine':8s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
        for engine, table in engines.items():
            listed = tmp / f"{engine}.txt"
            listed.write_text("\n".join(listing[:args.batch_images]))
            job = run_job({**BATCH_JOB, "inputs": [str(listed)], "output": str(tmp / f"out-{engine}"),
                           "engine": table})
            rate = args.batch_images / job["seconds"]
            print(f"  {engine:8s} {args.batch_images:7d} {job['seconds']:8.1f} {rate:9.2f}")
            results[engine] = {"images": args.batch_images, "seconds": job["seconds"], "images_per_s": rate,
                               "failed": job["failed"]}
        memory = {}
        cheap = {**BATCH_JOB, "methods": ["vanilla_gradient", "gradcam_pp"]}
        print(f"  peak RSS of the local engine ({', '.join(cheap['methods'])}):")
        for count in args.memory_images:
            listed = tmp / f"memory-{count}.txt"
            listed.write_text("\n".join(listing[:count]))
            job = run_job({**cheap, "inputs": [str(listed)], "output": str(tmp / f"memory-{count}")})
            memory[count] = job
            print(f"  {count:6d} images: {job['peak_rss_mib']:7.0f} MiB, {job['seconds']:6.1f} s")
        small, large = (memory[c]["peak_rss_mib"] for c in (args.memory_images[0], args.memory_images[-1]))
        print(f"  {args.memory_images[-1]} against {args.memory_images[0]} images: {large / small:.3f}x the peak RSS "
              f"(aim: within 10%)")
        results["memory"] = {"runs": memory, "ratio": large / small}
    return results


@section("adaptive")
def adaptive(args):
    """How many samples n="auto" takes on the scikit-image photos with EfficientNet-Lite0."""
    net = models.load("efficientnet-lite0")
    be = ms.load_backend("torch", model=net, preset="efficientnet-lite")
    pre = ms.get_preset("efficientnet-lite")
    photos = {name: pre.apply(rgb) for name, rgb in demo_photos().items()}
    tol = 0.05
    rows = adaptive_smoothgrad(be, photos, tol=tol)
    print(f"\nadaptive SmoothGrad (n=\"auto\", tol={tol}: relative L2 change of the max-scaled running mean over "
          f"the last 10 samples), EfficientNet-Lite0:")
    print(f"  {'photo':12s} {'auto used':>9s} {'auto vs n=100':>14s} {'samples to stay within tol of n=100':>36s}")
    for r in rows:
        print(f"  {r['photo']:12s} {r['auto_samples']:9d} {r['auto_vs_n100']:14.3f} {r['samples_to_n100_within_tol']:36d}")
    return {"tol": tol, "photos": rows}


# ---- the evaluation metrics against their reference implementations ----------------------------
EVAL_STEP = 224 * 8          # deletion/insertion pixels a step at 224 x 224: 28 steps, 29 forward passes
EVAL_PERCENTAGES = (20, 50, 80)


def released_causal_curve(model, img, explanation, mode, step):
    """The RISE paper's released CausalMetric.single_run procedure on one image (the reference of
    tests/evaluation/test_metrics_reference.py): the softmax model, one forward pass a step,
    pixels copied in place in order of np.flip(np.argsort(saliency)); the blur is its gkern conv2d."""
    import scipy.ndimage
    softmax = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    hw = img.shape[2] * img.shape[3]
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kern = np.zeros((3, 3, 11, 11), np.float32)
    for c in range(3):
        kern[c, c] = scipy.ndimage.gaussian_filter(delta, 5)
    with torch.no_grad():
        c = int(softmax(img).argmax(1))
        blurred = torch.nn.functional.conv2d(img, torch.from_numpy(kern), padding=5)
    start, finish = (img.clone(), torch.zeros_like(img)) if mode == "deletion" else (blurred, img.clone())
    n_steps = (hw + step - 1) // step
    scores = np.empty(n_steps + 1)
    order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores[i] = float(softmax(start)[0, c])
        if i < n_steps:
            coords = order[:, step * i:step * (i + 1)]
            start.numpy().reshape(1, 3, hw)[0, :, coords] = finish.numpy().reshape(1, 3, hw)[0, :, coords]
    return scores


def _resnet18_small():
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@section("metrics")
def metrics_section(args):
    """ms.evaluate's metrics against the reference implementations on the same work (issue 16)."""
    import quantus
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net = models.load("efficientnet-lite0")
    pre = ms.get_preset("efficientnet-lite")
    be = ms.load_backend("torch", model=net, preset=pre)
    ref = models.load("efficientnet-lite0").eval()
    x = pre.apply(demo_photos()["chelsea"])
    xt = torch.from_numpy(x)
    target = int(be.predict(x).argmax())
    sal = ms.vanilla_gradient(be, x, target=target)
    rows = {}

    def pair(work, ours, theirs, agree):
        seconds, outputs = best_times({"multisal": ours, "reference": theirs}, args.repeats, args.budget)
        diff = float(np.max(np.abs(np.asarray(outputs["multisal"], np.float64) -
                                   np.asarray(agree(outputs["reference"]), np.float64))))
        rows[work] = {"multisal_s": seconds["multisal"], "reference_s": seconds["reference"],
                      "ratio": seconds["multisal"] / seconds["reference"], "max_abs_diff": diff}

    for mode in ("deletion", "insertion"):
        pair(mode, lambda mode=mode: causal.causal_curves(be, x, sal, mode, target=target, step=EVAL_STEP)[0],
             lambda mode=mode: released_causal_curve(ref, xt, sal[0], mode, EVAL_STEP), lambda r: r)
    with torch.no_grad():
        clean = float(torch.softmax(ref(xt), 1)[0, target])
    cam = (sal - sal.min()) / (sal.max() - sal.min())
    for order, metric in (("morf", ROADMostRelevantFirst), ("lerf", ROADLeastRelevantFirst)):
        # pytorch-grad-cam's percentile q keeps the pixels below it: removing p% is its 100 - p.
        pair(f"road_{order}", lambda order=order: road.road_curves(be, x, cam, order, target, EVAL_PERCENTAGES)[0],
             lambda metric=metric: [float(metric(100 - p)(xt, cam, [ClassifierOutputSoftmaxTarget(target)], ref)[0])
                                    + clean for p in EVAL_PERCENTAGES],
             lambda r: r)

    small = _resnet18_small()
    sbe = ms.load_backend("torch", model=small, preset="torchvision-imagenet")
    xs = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ts = sbe.predict(xs).argmax(1)
    # The vanilla gradient: a randomised ResNet's Grad-CAM can be 0 everywhere, which Quantus refuses.
    original = ms.vanilla_gradient(sbe, xs, target=ts)

    def explain_func(model, inputs, targets, **kwargs):
        return ms.vanilla_gradient(ms.load_backend("torch", model=model), np.asarray(inputs, np.float32),
                                   target=np.asarray(targets, np.int64))

    spearman = quantus.similarity_func.correlation_spearman
    pair("randomization (resnet18, 64 px, every layer)",
         lambda: sanity.model_randomization(sbe, xs, lambda b, xx, t: ms.vanilla_gradient(b, xx, target=t), original, ts,
                                            steps=None, seed=5)[0],
         lambda: quantus.MPRT(layer_order="top_down", seed=4, abs=False, normalise=False, disable_warnings=True,
                              similarity_func=spearman)(model=small, x_batch=xs, y_batch=ts,
                                                        a_batch=original[:, None], explain_func=explain_func,
                                                        device="cpu"),
         lambda r: np.array([v for k, v in r.items() if k != "original"]).T)
    pair("random_logit (resnet18, 64 px)",
         lambda: sanity.random_logit(sbe, xs, lambda b, xx, t: ms.vanilla_gradient(b, xx, target=t), original, ts,
                                     seed=7),
         lambda: quantus.RandomLogit(num_classes=1000, seed=7, abs=False, normalise=False, disable_warnings=True,
                                     similarity_func=spearman)(model=small, x_batch=xs, y_batch=ts,
                                                               a_batch=original[:, None], explain_func=explain_func,
                                                               device="cpu"),
         lambda r: r)
    maps = np.repeat(sal, 16, axis=0) * np.random.default_rng(1).random((16, 1, 1)).astype(np.float32)
    xm = np.repeat(x, 16, axis=0)
    for name, ours, theirs in (("sparseness (16 maps)", sparsity.sparseness, quantus.Sparseness),
                               ("complexity (16 maps)", sparsity.complexity, quantus.Complexity)):
        pair(name, lambda ours=ours: ours(maps),
             lambda theirs=theirs: theirs(disable_warnings=True)(model=ref, x_batch=xm, y_batch=np.full(16, target),
                                                                 a_batch=maps[:, None].copy(), device="cpu"),
             lambda r: r)
    print("\nmetrics: multisal against the reference on the same work (EfficientNet-Lite0, chelsea, "
          "vanilla-gradient map, unless named)")
    print(f"  {'work':48s} {'multisal s':>10s} {'reference s':>11s} {'ratio':>6s} {'max |diff|':>10s}   reference")
    references = {"deletion": "RISE's released CausalMetric procedure", "insertion": "RISE's released CausalMetric procedure",
                  "road_morf": "pytorch-grad-cam ROADMostRelevantFirst", "road_lerf": "pytorch-grad-cam ROADLeastRelevantFirst"}
    for work, r in rows.items():
        print(f"  {work:48s} {r['multisal_s']:10.3f} {r['reference_s']:11.3f} {r['ratio']:5.2f}x {r['max_abs_diff']:10.2e}"
              f"   {references.get(work, 'Quantus')}")
    print("  (ROAD's max |diff| includes the two libraries' own imputation noise draws, std 0.01)")
    return rows
# ---- precision: reduced-precision versions of EfficientNet-Lite0 against its float32 export -----
def _float16(model):
    """onnxconverter-common's float16 conversion, inputs and outputs float16 too."""
    from onnxconverter_common import float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "the float32 number ... will be truncated": its weights' tails
        return float16.convert_float_to_float16(model)


# The reduced-precision versions timed against the float32 model: name -> ModelProto -> ModelProto.
PRECISIONS = {"float16": _float16}
PRECISION_WORKS = {"smoothgrad n=50": lambda be, x, t: ms.smoothgrad(be, x, target=t, n=50),
                   "gradcam_pp": lambda be, x, t: ms.gradcam_pp(be, x, target=t)}


@section("precision")
def precision(args):
    """SmoothGrad n=50 and Grad-CAM++ on EfficientNet-Lite0 as PRECISIONS convert it, against the
    float32 export on the same onnx backend and provider: seconds as ratios from one run, and the
    correlation of each map with the float32 one's (chelsea, 224x224, the float32 argmax class)."""
    import onnx
    import onnxruntime as ort
    pre = ms.get_preset("efficientnet-lite")
    x = pre.apply(demo_photos()["chelsea"], size=(224, 224))
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.append("CUDAExecutionProvider")
    else:
        print("\nprecision: no CUDAExecutionProvider here (onnxruntime-gpu and a GPU needed): CPU only")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(models.load("efficientnet-lite0"), Path(tmp) / "lite0.onnx")
        files = {"float32": path}
        for name, convert in PRECISIONS.items():
            files[name] = Path(tmp) / f"lite0.{name}.onnx"
            onnx.save(convert(onnx.load(str(path))), str(files[name]))
        for provider in providers:
            backends = {name: ms.load_backend("onnx", model=str(f), providers=[provider], cache_dir=tmp)
                        for name, f in files.items()}
            target = np.array([int(backends["float32"].predict(x).argmax())])
            print(f"\nprecision on {provider} (EfficientNet-Lite0, chelsea, class {int(target[0])}): "
                  "seconds per image, ratio to float32, correlation of the maps with float32's")
            rows = {}
            for work, call in PRECISION_WORKS.items():
                cases = {name: (lambda be=be: call(be, x, target)) for name, be in backends.items()}
                seconds, outputs = best_times(cases, args.repeats, args.budget)
                rows[work] = {name: {"seconds": seconds[name], "ratio": seconds[name] / seconds["float32"],
                                     "corr": correlation(outputs[name], outputs["float32"])} for name in cases}
                for name, row in rows[work].items():
                    print(f"  {work:16s} {name:10s} {row['seconds']:8.3f} s  x{row['ratio']:5.2f}  corr {row['corr']:.4f}")
            results[provider] = {"target": int(target[0]), "works": rows}
    return results


@section("int8")
def int8(args):
    """SmoothGrad (n=--n) and Grad-CAM++ on EfficientNet-Lite0 quantised to int8 (onnxruntime's
    quantize_static: QDQ, per channel, calibrated on the scikit-image photos) against the float32
    model it came from, both on the onnx backend on the CPU, chelsea at 224x224: the time ratios
    from one run, and how the maps correlate (the straight-through estimator, not an exact
    gradient)."""
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Photos(quantization.CalibrationDataReader):
        def __init__(self, batch):
            self.feeds = iter([{"input": batch[i:i + 1]} for i in range(len(batch))])

        def get_next(self):
            return next(self.feeds, None)

    preset = ms.get_preset("efficientnet-lite")
    photos = demo_photos()
    x = preset.apply(photos["chelsea"], size=(224, 224))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # TorchScript's exporter: the dynamo one keeps the weights in a side file the quantiser's
        # pre-processing does not follow. The float32 model timed is the pre-processed one it quantises.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(models.load("efficientnet-lite0"), (torch.zeros(1, 3, 224, 224),), str(tmp / "export.onnx"),
                              dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        quant_pre_process(str(tmp / "export.onnx"), str(tmp / "float.onnx"), skip_symbolic_shape=True)
        quantization.quantize_static(str(tmp / "float.onnx"), str(tmp / "int8.onnx"),
                                     Photos(np.concatenate([preset.apply(p, size=(224, 224)) for p in photos.values()])),
                                     quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                     activation_type=quantization.QuantType.QInt8,
                                     weight_type=quantization.QuantType.QInt8)
        backends = {kind: ms.load_backend("onnx", model=str(tmp / f"{kind}.onnx"), cache_dir=tmp, preset=preset)
                    for kind in ("float", "int8")}
        target = int(backends["float"].predict(x).argmax())
        lo, hi = preset.value_range
        works = {"smoothgrad": lambda be: ms.smoothgrad(be, x, target, n=args.n, sigma=NOISE_LEVEL * (hi - lo), seed=0),
                 "gradcam_pp": lambda be: ms.gradcam_pp(be, x, target)}
        print(f"\nint8 (QDQ, per channel) EfficientNet-Lite0 against float32, onnx backend, CPU, 224x224, "
              f"SmoothGrad n={args.n}:")
        print(f"  {'work':12s} {'float32 s':>10s} {'int8 s':>8s} {'int8/float32':>13s} {'corr':>6s}")
        results = {}
        for work, call in works.items():
            seconds, outputs = best_times({kind: (lambda be=be: call(be)) for kind, be in backends.items()},
                                          args.repeats, args.budget)
            ratio, corr = seconds["int8"] / seconds["float"], correlation(outputs["int8"], outputs["float"])
            print(f"  {work:12s} {seconds['float']:10.3f} {seconds['int8']:8.3f} {ratio:13.2f} {corr:6.3f}")
            results[work] = {"float32_s": seconds["float"], "int8_s": seconds["int8"], "ratio": ratio, "corr": corr}
    return results


def subset(choices):
    def parse(text):
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(choices)}")
        return items
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", type=subset(SECTIONS), default=list(SECTIONS),
                        help=f"comma-separated, default all: {','.join(SECTIONS)}")
    parser.add_argument("--models", type=subset(MODELS), default=list(MODELS),
                        help=f"comma-separated, default all: {','.join(MODELS)}")
    parser.add_argument("--works", type=subset(WORKS), default=list(WORKS),
                        help=f"comma-separated, default all: {','.join(WORKS)}")
    parser.add_argument("--n", type=int, default=50,
                        help="samples of SmoothGrad and Smooth Grad-CAM++, steps of Integrated Gradients (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per work, the best kept (default 3)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="fewer rounds where a work's rounds would take longer than this, in seconds (default 60)")
    parser.add_argument("--plain-references", action="store_true",
                        help="give the references the model as loaded (parameters requiring grad, NCHW) instead "
                             "of frozen parameters in the torch backend's memory layout")
    parser.add_argument("--batch-images", type=int, default=64, help="images of the batch section's engine runs (64)")
    parser.add_argument("--memory-images", type=lambda t: sorted(int(v) for v in t.split(",")), default=[100, 1000],
                        help="job sizes whose peak RSS the batch section compares (default 100,1000)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc thresholds as they are (default: ms.tune_malloc(), as the "
                             "multisal command does; it applies to the whole process, references included)")
    parser.add_argument("--json", default="out/bench/bench.json", help="where to save the results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"captum\.")   # "Input Tensor 0 did not already require gradients"

    start = time.perf_counter()
    tuned = not args.system_malloc and ms.tune_malloc()
    print(f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"{'tuned' if tuned else 'system'} malloc")
    results = {name: SECTIONS[name](args) for name in args.sections}
    record = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "malloc": "tuned" if tuned else "system", "date": time.strftime("%Y-%m-%d")},
              "options": {k: v for k, v in vars(args).items() if k != "json"},
              "results": results, "wall_s": time.perf_counter() - start}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\n{time.perf_counter() - start:.0f} s in all; saved {path}")


if __name__ == "__main__":
    main()
