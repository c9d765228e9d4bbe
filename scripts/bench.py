#!/usr/bin/env python
"""Speed of multisal against the reference libraries on the same work, in one run, as ratios.

SmoothGrad, n=50, on EfficientNet-Lite0 (real ImageNet weights) at 224x224 on the CPU:
- multisal's torch backend (its own batch size from the memory budget),
- Captum's NoiseTunnel(Saliency) at each nt_samples_batch_size, the best one kept,
- a plain PyTorch loop (noise, forward, autograd.grad w.r.t. the input, |g| max over channels,
  mean) at each batch size, the best one kept.
Each timing is the best of --repeats runs, the cases interleaved. Results are printed and saved as JSON (--json).
Timings belong here, never in the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import multisal as ms
from multisal import models
from multisal.demo import demo_photos

BATCH_SIZES = (1, 5, 10, 25, 50)


def best_times(cases, repeats):
    """Best-of-`repeats` seconds per case, the cases interleaved round by round so that drift in
    the machine's speed (other load, clocks) falls on all of them alike."""
    for fn in cases.values():
        fn()  # warm-up: first-call allocations and thread pools
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="SmoothGrad samples (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case; the best is kept")
    parser.add_argument("--json", default="out/bench/bench.json", help="where to save the results")
    args = parser.parse_args(argv)

    from captum.attr import NoiseTunnel, Saliency

    preset = ms.get_preset(models.preset_for("efficientnet-lite0"))
    be = ms.load_backend("torch", model=models.load("efficientnet-lite0"), preset=preset)
    # The references get a model of their own: the backend may change its model's memory layout.
    net = models.load("efficientnet-lite0")
    x = preset.apply(demo_photos()["chelsea"])
    target = int(be.predict(x).argmax())
    lo, hi = preset.value_range
    sigma = 0.15 * (hi - lo)
    n = args.n

    nt = NoiseTunnel(Saliency(net))
    xt = torch.from_numpy(x)
    cases = {"multisal": lambda: ms.smoothgrad(be, x, target, n=n, sigma=sigma)}
    for b in BATCH_SIZES:
        cases[f"captum/{b}"] = lambda b=b: nt.attribute(xt, nt_type="smoothgrad", nt_samples=n, stdevs=sigma,
                                                        target=target, nt_samples_batch_size=b)
        cases[f"plain/{b}"] = lambda b=b: plain_loop(net, x, target, n, sigma, b)
    seconds = best_times(cases, args.repeats)
    print(f"multisal torch backend       {seconds['multisal']:.3f} s  (batch {be.batch_size(x.shape[1:])})")
    for b in BATCH_SIZES:
        print(f"captum NoiseTunnel batch {b:3d}  {seconds[f'captum/{b}']:.3f} s")
    for b in BATCH_SIZES:
        print(f"plain torch loop batch {b:3d}    {seconds[f'plain/{b}']:.3f} s")
    captum = {b: seconds[f"captum/{b}"] for b in BATCH_SIZES}
    plain = {b: seconds[f"plain/{b}"] for b in BATCH_SIZES}
    cb, pb = min(captum, key=captum.get), min(plain, key=plain.get)
    results = dict(multisal=seconds["multisal"], captum_best=captum[cb], captum_best_batch=cb,
                   plain_best=plain[pb], plain_best_batch=pb, captum=captum, plain=plain)
    ratios = {"multisal / captum NoiseTunnel": results["multisal"] / captum[cb],
              "multisal / plain torch loop": results["multisal"] / plain[pb]}
    print(f"\nSmoothGrad n={n}, EfficientNet-Lite0 224x224, CPU ({torch.get_num_threads()} threads)")
    for name, r in ratios.items():
        print(f"  {name:32s} {r:5.2f}x   (lower is better; aims: <= 1.00x captum, <= 1.05x plain)")
    record = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "smoothgrad_n": n, "seconds": results, "ratios": ratios}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
