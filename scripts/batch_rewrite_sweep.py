#!/usr/bin/env python
"""How many timm architectures exported to ONNX with a fixed batch of 1 take a batch after
multisal's batch rewrite (backends/onnx/model.py: free_batch, kept only where same_outputs holds).

Each architecture (random weights, pretrained=False, a small input where the model allows one) is
exported at batch 1 with fixed shapes by both of torch's exporters, TorchScript (dynamo=False) and
dynamo (dynamo=True), into --cache (reused on later runs, so a sweep after a change to the rewrite
re-runs only the rewrite). Each export is then prepared as the onnx backend prepares it, and the
script prints per export whether it takes a batch ("batch"), stays at one image per call ("one":
the rewrite gave up, or its check refused it), or failed to export or load, and the counts.
Slow: minutes per architecture on a small machine (the exports); not a test.

    python scripts/batch_rewrite_sweep.py --cache ~/.cache/multisal/sweep [--only vit,swin] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import onnx
import timm
import torch

from multisal.backends.onnx.model import free_batch, prepare_model
from multisal.errors import MultisalError
from multisal.progress import progress_bar

# (timm name, create_model keywords, input side): small inputs where the model takes an img_size,
# the depths of the largest ones cut (the batch-dependent constructions are per block, not per depth).
ARCHITECTURES = [
    ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    ("deit_tiny_patch16_224", {"img_size": 64}, 64),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
    ("vit_small_patch16_224.augreg_in21k", {"img_size": 64, "depth": 2, "reg_tokens": 4}, 64),
    ("beit_base_patch16_224", {"img_size": 64, "depth": 2}, 64),
    ("eva02_tiny_patch14_224", {"img_size": 56}, 56),
    ("cait_xxs24_224", {"img_size": 64, "depth": 4}, 64),
    ("xcit_nano_12_p16_224", {"img_size": 64}, 64),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, 64),
    ("swinv2_tiny_window8_256", {"img_size": 64, "window_size": 4}, 64),
    ("maxvit_nano_rw_256", {"img_size": 64}, 64),
    ("coatnet_nano_rw_224", {"img_size": 64}, 64),
    ("pvt_v2_b0", {}, 64),
    ("twins_pcpvt_small", {"depths": (1, 1, 1, 1)}, 64),
    ("levit_128s", {"img_size": 128}, 128),
    ("efficientformerv2_s0", {"img_size": 64}, 64),
    ("focalnet_tiny_srf", {}, 64),
    ("mixer_s16_224", {"img_size": 64}, 64),
    ("resmlp_12_224", {"img_size": 64}, 64),
    ("convnext_atto", {}, 64),
    ("convnextv2_atto", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("poolformer_s12", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("sequencer2d_s", {}, 64),
    ("volo_d1_224", {"img_size": 64}, 64),
    ("resnet18", {}, 64),
    ("resnet50", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("mobilenetv3_small_100", {}, 64),
    ("regnetx_002", {}, 64),
    ("densenet121", {}, 64),
    ("inception_v3", {}, 96),
    ("vgg11", {}, 64),
    ("ghostnet_100", {}, 64),
    ("repvgg_a0", {}, 64),
    ("dla34", {}, 64),
    ("convmixer_768_32", {}, 64),
    ("tresnet_m", {}, 64),
    ("inception_v4", {}, 96),
    ("fastvit_t8", {}, 64),
    ("davit_tiny", {"depths": (1, 1, 1, 1)}, 64),
    ("gcvit_xxtiny", {"img_size": 64}, 64),
    ("efficientvit_b0", {}, 64),
]
EXPORTERS = {"torchscript": False, "dynamo": True}


def export(name, kwargs, side, dynamo, path):
    """The architecture exported at batch 1, fixed shapes, to path. Attention is timm's explicit
    form (MatMul, Softmax), not scaled_dot_product_attention, which TorchScript cannot export for
    some models and whose Softmax a CAM or rollout on ONNX could not read."""
    timm.layers.set_fused_attn(False)
    net = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    sample = torch.zeros(1, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(net, (sample,), None, dynamo=True, input_names=["x"], output_names=["y"],
                                        verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(net, (sample,), str(path), dynamo=False, input_names=["x"], output_names=["y"])


def outcome(path):
    """"batch", "one (no rewrite)", "one (check refused)" or "load failed: <why>"."""
    try:
        prepared = prepare_model(str(path))
    except MultisalError as err:
        return f"load failed: {err}"
    if not prepared.batch_one:
        return "batch"
    return "one (no rewrite)" if free_batch(onnx.load(str(path))) is None else "one (check refused)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="folder for the exported .onnx files")
    parser.add_argument("--only", default="", help="comma-separated substrings of architecture names")
    parser.add_argument("--json", type=Path, help="write the per-export outcomes here")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    chosen = [a for a in ARCHITECTURES if not args.only or any(s in a[0] for s in args.only.split(","))]
    results = {}
    jobs = [(a, e) for a in chosen for e in EXPORTERS]
    for (name, kwargs, side), exporter in progress_bar(jobs, desc="exports", enabled=True, unit="export"):
        path = args.cache / f"{name}-{side}-{exporter}.onnx"
        failed = args.cache / f"{path.name}.failed"
        if not path.is_file() and not failed.is_file():
            try:
                export(name, kwargs, side, EXPORTERS[exporter], path)
            except Exception as err:   # any exporter failure is a row of the table, not the end of the sweep
                failed.write_text(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
        results[f"{name} {exporter}"] = (f"export failed: {failed.read_text()}" if failed.is_file()
                                         else outcome(path))
        print(f"{name:36s} {exporter:12s} {results[f'{name} {exporter}']}", flush=True)
    for exporter in EXPORTERS:
        rows = [v for k, v in results.items() if k.endswith(exporter)]
        exported = [v for v in rows if not v.startswith(("export failed", "load failed"))]
        batch = sum(v == "batch" for v in exported)
        print(f"{exporter}: {batch} of {len(exported)} exports take a batch "
              f"({100 * batch / max(len(exported), 1):.0f}%; {len(rows) - len(exported)} failed to export or load)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
