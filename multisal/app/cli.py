"""The `multisal` command: explain, batch, evaluate, demo, methods, layers, check, export-grad.

Exit status: 0 on success; 2 for bad usage, a configuration, model or output folder that cannot
run, with one line on stderr, before anything is written; 1 when some inputs failed (each listed
on stderr with its reason; the others still have output), or when the run itself broke off (a
full disk); 3 from `check` when only the forward-only methods can explain the model; 130 on Ctrl-C. No traceback reaches the user unless MULTISAL_DEBUG=1 is set.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

from ..backends.onnx.backend import export_gradient_graph
from ..backends.onnx.check import check_model
from ..errors import MultisalError
from ..evaluation import METRICS, check_metrics
from ..methods import METHODS
from ..objectives import OBJECTIVES
from ..registry import backends
from .config import parse_inline_table, read_toml
from .demo import run_demo
from .evaluate_run import evaluate_run
from .loading import load_backend
from .malloc import tune_malloc
from .runs import run_batch, run_explain

EXPLAIN_EXAMPLES = """examples:
  multisal explain cat.jpg dog.png --out out/pets
  multisal explain photos/*.jpg --model efficientnet-lite0 --method smoothgrad,gradcam_pp
  multisal explain --config examples/torch.toml --backend onnx --target "Egyptian cat"
  multisal explain img.png --model mypkg.nets:build --preset torchvision-imagenet --layer layer4
  multisal explain skimage:chelsea --progression --method smoothgrad
  multisal explain skimage:chelsea --method gradcam,rise --evaluate --metrics deletion,insertion
  multisal explain street.jpg --backend onnx --model yolov8n.onnx --preset raw --size 640 640 \
      --target '{detection = {class = 0, box = [120, 40, 260, 300]}}'

Options given here override the config file key by key (see README, "Configuration")."""

BATCH_EXAMPLES = """examples:
  multisal batch --config job.toml
  multisal batch --config job.toml --engine ray      # the same job on a Ray cluster
  multisal batch val/*.JPEG --method gradcam_pp --out out/val --batch-size 32

A rerun with the same output folder resumes: inputs already done are skipped, the rest (never
reached, cut off by a crash, or failed) are explained again. Exit status 1 if any input failed."""


def _methods(_args):
    """One line per method: its name and its docstring's summary line (which cites the paper)."""
    for name, fn in METHODS.items():
        print(f"{name:22s} {method_summary(fn)}")
    return 0


def method_summary(fn) -> str:
    """The first line of a method's docstring."""
    return (inspect.getdoc(fn) or "").split("\n", 1)[0]


def _demo(args):
    run_demo(args.out, n=args.n)
    return 0


def _layers(args):
    """List a model's candidate CAM layers (feature maps with spatial size > 1: NCHW, NHWC or tokens
    on a grid), each with its layout and grid, then the attention probabilities attention rollout reads."""
    backend = args.backend or next((name for name, cls in backends().items()
                                    if any(str(args.model).lower().endswith(s) for s in cls.model_files)), "torch")
    cls = backends().get(backend)
    if cls is None:
        raise MultisalError(f"unknown backend {backend!r}: expected one of {', '.join(backends())}")
    cls.require_framework()
    model = cls.open_model(args.model, args.weights)
    be = load_backend(backend, model=model)
    shape = tuple(args.shape) if args.shape else (be.sample_shape or (3, 224, 224))
    if any(d is None for d in shape):
        raise MultisalError(f"{args.model} leaves its input size free: give --shape C H W")
    candidates = be.candidate_layers(shape)
    layouts = be.layer_layouts(shape)
    default = be.default_layer(shape) if candidates else None
    for name, dims in candidates:
        layout = layouts[name].describe() if name in layouts else "nchw"
        print(f"{name:48s} {'x'.join(map(str, dims)):>14s}  {layout:16s}{'   (default)' if name == default else ''}")
    shapes = {record.name: record.shape for record in be.layer_records(shape)}
    for name in be.attention_layers(shape):
        print(f"{name:48s} {'x'.join(map(str, shapes[name])):>14s}  attention")
    return 0


def _export_grad(args):
    path = export_gradient_graph(args.model, args.out, layers=args.layer or (), objective=args.objective,
                                    input_grad=not args.no_input_grad, input_shape=args.shape)
    print(f"wrote {path}")
    return 0


CHECK_EXAMPLES = """examples:
  multisal check model.onnx
  multisal check ocr.onnx --shape 1 64 256     # an input of free size: probe it at one

Exit status 0 when every op on the input gradient's path has a gradient rule (every method works),
3 when only the forward-only methods (occlusion, rise, scorecam, ablationcam, eigencam) can explain
the model through the ops listed without a rule."""


def _check(args):
    report = check_model(args.model, input_shape=args.shape)
    print("\n".join(printable(line) for line in report.lines()))
    return report.exit_status


def _dimension(text):
    """One axis of --shape: an integer 1..8192."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 8192:
        raise argparse.ArgumentTypeError(f"{value} is out of range: each of C H W must be 1..8192")
    return value


def _split_methods(values):
    """--method a,b --method c -> [a, b, c] (None when not given)."""
    if not values:
        return None
    return [m.strip() for v in values for m in v.split(",") if m.strip()]


def _target(text):
    """--target: "auto", a class index, a class name, or a TOML inline table (a detection target,
    spelt as in a configuration)."""
    if text is None:
        return None
    if text.strip().startswith("{"):
        return parse_inline_table(text, "--target")
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _overrides(args):
    return {
        "inputs": args.images or None, "backend": args.backend, "model": args.model, "weights": args.weights,
        "preset": args.preset, "methods": _split_methods(args.method), "target": _target(args.target),
        "layer": args.layer, "output": args.out, "labels": args.labels,
        "size": list(args.size) if args.size else None, "progression": True if args.progression else None,
    }


def _explain(args):
    metrics = _metrics(args)
    return _summary(run_explain(args.config, _overrides(args)), metrics)


def _metrics(args):
    """--metrics a,b (checked before anything runs), or every metric; None without --evaluate."""
    if not args.evaluate:
        if args.metrics:
            raise MultisalError("--metrics goes with --evaluate")
        return None
    return check_metrics(_split_methods(args.metrics)) if args.metrics else METRICS


def _evaluate(args):
    metrics = check_metrics(_split_methods(args.metrics)) if args.metrics else METRICS
    return _evaluation_summary(evaluate_run(args.run_dir, metrics, progress=sys.stderr.isatty()))


def _evaluation_summary(result):
    for source, reason in result.failed:
        print(f"multisal: not evaluated: {printable(source)}: {printable(reason)}", file=sys.stderr)
    scored = sum("evaluation" in r for r in result.records)
    print(f"{scored} inputs evaluated; report: {printable(result.report)}")
    return 1 if result.failed else 0


def _batch(args):
    overrides = _overrides(args)
    engine = {k: v for k, v in (("name", args.engine), ("batch_size", args.batch_size)) if v is not None}
    if engine:
        base = read_toml(args.config) if args.config else {}
        overrides["engine"] = {**base.get("engine", {}), **engine}
    metrics = _metrics(args)
    return _summary(run_batch(args.config, overrides), metrics)


def _summary(run, metrics=None):
    for record in run.failed:
        print(f"multisal: failed: {printable(record['input'])}: {printable(record['error'])}", file=sys.stderr)
    ok = len(run.records) - len(run.failed)
    skipped = f" ({run.skipped} done before)" if run.skipped else ""
    print(f"{ok} of {len(run.records)} inputs explained{skipped}; report: {printable(run.report)}")
    status = 1 if run.failed else 0
    if metrics is not None and ok:
        status = max(status, _evaluation_summary(evaluate_run(run.output, metrics, progress=sys.stderr.isatty())))
    return status


def printable(text) -> str:
    """Text for a terminal: control characters (an escape sequence in a file name) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(str(text).split()))


class _Parser(argparse.ArgumentParser):
    """argparse, with bad usage said in one line (the command's --help has the rest)."""

    def error(self, message):
        self.exit(2, f"multisal: error: {printable(message)} (see `{self.prog} --help`)\n")


def _run_options(p):
    """The options explain and batch share (each replaces the config file's key)."""
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files, globs, folders, .txt lists or skimage:NAME (replace the config's inputs)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (see examples/)")
    p.add_argument("--backend", help=" | ".join(backends()))
    p.add_argument("--model", help="a models/ name, an .onnx/.pt/.pth file, or package.module:factory")
    p.add_argument("--weights", metavar="FILE", help="weights for a models/ name or a factory (a state dict / .npz)")
    p.add_argument("--preset", help="preprocessing preset (default: the model's own)")
    p.add_argument("--method", action="append", metavar="NAME[,NAME]", help="method(s) to run (repeatable; default: all)")
    p.add_argument("--target", help='"auto" (the top class), "argmax_per_sample", a class index, a class name, or a '
                   "detection: '{detection = {class = 0, box = [x1, y1, x2, y2], iou = 0.5}}'")
    p.add_argument("--layer", help="the CAM methods' layer (default: `multisal layers` marks it)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--labels", metavar="FILE", help="class names, one a line (default: ImageNet's for 1000 classes)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="model input size")
    p.add_argument("--progression", action="store_true",
                   help="also write SmoothGrad after 1, 2, 3, 10, 20, 30, 50, 75, 100 samples (one pass)")
    p.add_argument("--evaluate", action="store_true",
                   help="then score every map (and a random and a Sobel baseline) and add the scores to the "
                        "report and the manifest (as `multisal evaluate`)")
    _metrics_option(p)


def _metrics_option(p):
    p.add_argument("--metrics", action="append", metavar="NAME[,NAME]",
                   help=f"the metrics of the evaluation (repeatable; default all: {', '.join(METRICS)})")


def _parser():
    parser = _Parser(prog="multisal", description="Gradient saliency for PyTorch, ONNX and Chainer models.",
                                     epilog="example: multisal explain cat.jpg --out out/cat   (multisal COMMAND --help for more)")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("explain", help="explain images with saliency maps; writes maps, overlays and an HTML report",
                       epilog=EXPLAIN_EXAMPLES, formatter_class=raw)
    _run_options(p)
    p.set_defaults(func=_explain)

    p = sub.add_parser("batch", help="a resumable explain job over many images, on the local or the ray engine",
                       epilog=BATCH_EXAMPLES, formatter_class=raw)
    _run_options(p)
    p.add_argument("--engine", choices=["local", "ray"], help="where the work runs (replaces [engine] name)")
    p.add_argument("--batch-size", type=int, metavar="N", help="images explained together (replaces [engine] batch_size)")
    p.set_defaults(func=_batch)

    p = sub.add_parser("evaluate", help="score the maps of a finished run; adds the scores to its index.html "
                                        "and manifest", epilog="example: multisal evaluate out/pets --metrics "
                                                               "deletion,insertion,sparseness")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the output folder of a finished explain or batch run")
    _metrics_option(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="explain the scikit-image photos with EfficientNet-Lite0 on torch and onnx",
                       epilog="example: multisal demo --out out/demo")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--n", type=int, default=50, help="SmoothGrad samples and IG steps (default: 50)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("methods", help="list the saliency methods", epilog="example: multisal methods")
    p.set_defaults(func=_methods)

    p = sub.add_parser("layers", help="list a model's candidate CAM layers with their layout (nchw, nhwc, tokens) and "
                       "grid, then its attention layers",
                       epilog="example: multisal layers model.onnx   |   multisal layers efficientnet-lite0")
    p.add_argument("model", help="an .onnx or .pt file, a models/ name (efficientnet-lite0) or package.module:factory")
    p.add_argument("--backend", help=f"{' | '.join(backends())} (default: onnx for .onnx files, else torch)")
    p.add_argument("--weights", metavar="FILE", help="weights for a models/ name or a factory")
    p.add_argument("--shape", type=_dimension, nargs=3, metavar=("C", "H", "W"), help="input size when the model leaves it free")
    p.set_defaults(func=_layers)

    p = sub.add_parser("check", help="what multisal can do with an ONNX model: types, shapes, ops with and without "
                                     "gradient rules, the methods that work", epilog=CHECK_EXAMPLES, formatter_class=raw)
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--shape", type=_dimension, nargs=3, metavar=("C", "H", "W"), help="input size when the model leaves it free")
    p.set_defaults(func=_check)

    p = sub.add_parser("export-grad", help="write the gradient graph of an ONNX model as a plain .onnx",
                       epilog="example: multisal export-grad model.onnx model.grad.onnx --layer features.29 --objective logit")
    p.add_argument("model", help="the .onnx model")
    p.add_argument("out", help="where to write the gradient graph")
    p.add_argument("--layer", action="append", help="a tensor name whose activation and gradient to output (repeatable)")
    p.add_argument("--objective", default="logit", choices=list(OBJECTIVES))
    p.add_argument("--no-input-grad", action="store_true", help="only layer gradients (prunes the backward pass)")
    p.add_argument("--shape", type=_dimension, nargs=3, metavar=("C", "H", "W"), help="input size when the model leaves it free")
    p.set_defaults(func=_export_grad)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)   # bad usage: one line, exit status 2
    tune_malloc()                       # this process is ours: keep autograd's large blocks (multisal/app/malloc.py)
    if os.environ.get("MULTISAL_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("multisal: interrupted (a batch run resumes where it stopped)", file=sys.stderr)
        return 130
    except MultisalError as err:
        print(f"multisal: error: {printable(err)}", file=sys.stderr)
        return 2
    except OSError as err:   # the disk, while the run was writing: full, gone, read-only
        where = f" {err.filename!r}" if err.filename else ""
        print(f"multisal: error: cannot write or read{where}: {printable(err.strerror or err)}", file=sys.stderr)
        return 1
    except Exception as err:   # noqa: BLE001 - a bug, or a framework's failure multisal did not foresee
        print(f"multisal: error: {type(err).__name__}: {printable(err)} (MULTISAL_DEBUG=1 shows where)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
