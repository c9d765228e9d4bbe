#!/usr/bin/env python
"""Speed of multisal against the reference libraries on the same work, in one run, as ratios.

On EfficientNet-Lite0 (real ImageNet weights) at 224x224 on the CPU:
- SmoothGrad n=50: multisal's torch backend against Captum's NoiseTunnel(Saliency) and a plain
  PyTorch loop (noise, forward, autograd.grad w.r.t. the input, |g| max over channels, mean),
  each reference at every batch size, its best kept;
- the ONNX backend: SmoothGrad n=50 and Grad-CAM++ against the torch backend, Captum's
  NoiseTunnel and pytorch-grad-cam's GradCAMPlusPlus.
Each timing is the best of --repeats runs, the cases of a section interleaved round by round.
Results are printed and saved as JSON (--json). Timings belong here, never in the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import multisal as ms
from multisal import models
from multisal.demo import demo_photos

BATCH_SIZES = (1, 5, 10, 25, 50)


def best_times(cases, repeats):
    """Best-of-`repeats` seconds per case, the cases interleaved round by round so that drift in
    the machine's speed (other load, clocks) falls on all of them alike."""
    for fn in cases.values():
        fn()  # warm-up: first-call allocations, thread pools, gradient graphs
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def plain_loop(model, x, target, n, sigma, batch):
    """What a careful user writes by hand: batched noisy copies, gradient of the target logit."""
    xt = torch.from_numpy(x)
    total = torch.zeros(x.shape[2:])
    for start in range(0, n, batch):
        k = min(batch, n - start)
        noisy = (xt + sigma * torch.randn(k, *x.shape[1:])).requires_grad_(True)
        out = model(noisy)
        (g,) = torch.autograd.grad(out[:, target].sum(), noisy)
        total += g.abs().amax(dim=1).sum(0)
    return total / n


def report(title, seconds, ratios, aims=""):
    print(f"\n{title}")
    for name, s in seconds.items():
        print(f"  {name:36s} {s:7.3f} s")
    for name, r in ratios.items():
        print(f"  {name:36s} {r:7.2f}x")
    if aims:
        print(f"  (lower is better; aims: {aims})")


def bench_smoothgrad_torch(ctx, repeats):
    from captum.attr import NoiseTunnel, Saliency

    be, net, x, target, sigma, n = ctx["torch"], ctx["net"], ctx["x"], ctx["target"], ctx["sigma"], ctx["n"]
    nt = NoiseTunnel(Saliency(net))
    xt = torch.from_numpy(x)
    cases = {"multisal torch": lambda: ms.smoothgrad(be, x, target, n=n, sigma=sigma)}
    for b in BATCH_SIZES:
        cases[f"captum NoiseTunnel batch {b}"] = lambda b=b: nt.attribute(
            xt, nt_type="smoothgrad", nt_samples=n, stdevs=sigma, target=target, nt_samples_batch_size=b)
        cases[f"plain torch loop batch {b}"] = lambda b=b: plain_loop(net, x, target, n, sigma, b)
    seconds = best_times(cases, repeats)
    captum = min(v for k, v in seconds.items() if k.startswith("captum"))
    plain = min(v for k, v in seconds.items() if k.startswith("plain"))
    ratios = {"multisal torch / captum (best batch)": seconds["multisal torch"] / captum,
              "multisal torch / plain loop (best batch)": seconds["multisal torch"] / plain}
    report(f"SmoothGrad n={n}, torch backend (batch {be.batch_size(x.shape[1:])})", seconds, ratios,
           "<= 1.00x captum, <= 1.05x plain loop")
    return {"seconds": seconds, "ratios": ratios}


def bench_onnx(ctx, repeats):
    from captum.attr import NoiseTunnel, Saliency
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    bt, net, x, target, sigma, n = ctx["torch"], ctx["net"], ctx["x"], ctx["target"], ctx["sigma"], ctx["n"]
    with tempfile.TemporaryDirectory() as tmp:
        bo = ms.load_backend("onnx", model=str(models.export_onnx("efficientnet-lite0", cache_dir=tmp)),
                             cache_dir=tmp, preset=ctx["preset"])
        nt = NoiseTunnel(Saliency(net))
        xt = torch.from_numpy(x)
        best_nt = ctx["captum_best_batch"]
        gcpp = GradCAMPlusPlus(model=net, target_layers=[net._relu_head])
        cases = {
            "smoothgrad onnx": lambda: ms.smoothgrad(bo, x, target, n=n, sigma=sigma),
            "smoothgrad torch": lambda: ms.smoothgrad(bt, x, target, n=n, sigma=sigma),
            f"smoothgrad captum batch {best_nt}": lambda: nt.attribute(
                xt, nt_type="smoothgrad", nt_samples=n, stdevs=sigma, target=target, nt_samples_batch_size=best_nt),
            "gradcam_pp onnx": lambda: ms.gradcam_pp(bo, x, target),
            "gradcam_pp torch": lambda: ms.gradcam_pp(bt, x, target),
            "gradcam_pp pytorch-grad-cam": lambda: gcpp(input_tensor=xt, targets=[ClassifierOutputTarget(target)]),
        }
        seconds = best_times(cases, repeats)
    ratios = {"smoothgrad onnx / torch backend": seconds["smoothgrad onnx"] / seconds["smoothgrad torch"],
              "smoothgrad onnx / captum": seconds["smoothgrad onnx"] / seconds[f"smoothgrad captum batch {best_nt}"],
              "gradcam_pp onnx / torch backend": seconds["gradcam_pp onnx"] / seconds["gradcam_pp torch"],
              "gradcam_pp onnx / pytorch-grad-cam": seconds["gradcam_pp onnx"] / seconds["gradcam_pp pytorch-grad-cam"]}
    report(f"ONNX backend (batch {bo.batch_size(x.shape[1:])}): SmoothGrad n={n} and Grad-CAM++", seconds, ratios,
           "smoothgrad onnx <= 0.4x torch backend")
    return {"seconds": seconds, "ratios": ratios}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="SmoothGrad samples (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case; the best is kept")
    parser.add_argument("--json", default="out/bench/bench.json", help="where to save the results")
    args = parser.parse_args(argv)

    preset = ms.get_preset(models.preset_for("efficientnet-lite0"))
    be = ms.load_backend("torch", model=models.load("efficientnet-lite0"), preset=preset)
    x = preset.apply(demo_photos()["chelsea"])
    lo, hi = preset.value_range
    ctx = {"preset": preset, "torch": be, "x": x, "target": int(be.predict(x).argmax()), "sigma": 0.15 * (hi - lo),
           "n": args.n,
           # The references get a model of their own: the backend may change its model's memory layout.
           "net": models.load("efficientnet-lite0")}
    print(f"EfficientNet-Lite0 224x224, CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    results = {"smoothgrad_torch": bench_smoothgrad_torch(ctx, args.repeats)}
    captum = {k: v for k, v in results["smoothgrad_torch"]["seconds"].items() if k.startswith("captum")}
    ctx["captum_best_batch"] = int(min(captum, key=captum.get).rsplit(" ", 1)[1])
    results["onnx"] = bench_onnx(ctx, args.repeats)
    record = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "date": time.strftime("%Y-%m-%d")}, "n": args.n, "results": results}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
