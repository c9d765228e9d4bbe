"""The `multisal` command."""
from __future__ import annotations

import argparse
import sys

from .errors import MultisalError


def _methods(_args):
    from . import METHODS
    for name, fn in METHODS.items():
        print(f"{name:22s} {(fn.__module__ and sys.modules[fn.__module__].__doc__ or '').strip().splitlines()[0]}")
    return 0


def _demo(args):
    from .demo import run_demo
    run_demo(args.out, n=args.n)
    return 0


def _layers(args):
    """List a model's candidate CAM layers: float 4-D activations with spatial size > 1."""
    import multisal as ms
    if str(args.model).endswith(".onnx"):
        be = ms.load_backend("onnx", model=args.model)
    else:
        from . import models
        be = ms.load_backend("torch", model=models.load(args.model))
    shape = tuple(args.shape) if args.shape else (be.sample_shape or (3, 224, 224))
    if any(d is None for d in shape):
        raise MultisalError(f"{args.model} leaves its input size free: give --shape C H W")
    candidates = be.candidate_layers(shape)
    default = candidates[-1][0] if candidates else None
    for name, dims in candidates:
        print(f"{name:48s} {'x'.join(map(str, dims)):>14s}{'   (default)' if name == default else ''}")
    return 0


def _export_grad(args):
    import multisal as ms
    path = ms.export_gradient_graph(args.model, args.out, layers=args.layer or (), objective=args.objective,
                                    input_grad=not args.no_input_grad, input_shape=args.shape)
    print(f"wrote {path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="multisal", description="Gradient saliency for PyTorch, ONNX and Chainer models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="explain the scikit-image photos with EfficientNet-Lite0",
                       epilog="example: multisal demo --out out/demo")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--n", type=int, default=50, help="SmoothGrad samples and IG steps (default: 50)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("methods", help="list the saliency methods", epilog="example: multisal methods")
    p.set_defaults(func=_methods)
    p = sub.add_parser("layers", help="list a model's candidate layers for Grad-CAM (4-D activations)",
                       epilog="example: multisal layers model.onnx   |   multisal layers efficientnet-lite0")
    p.add_argument("model", help="an .onnx file or a model name (efficientnet-lite0)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("C", "H", "W"), help="input size when the model leaves it free")
    p.set_defaults(func=_layers)
    p = sub.add_parser("export-grad", help="write the gradient graph of an ONNX model as a plain .onnx",
                       epilog="example: multisal export-grad model.onnx model.grad.onnx --layer features.29 --objective logit")
    p.add_argument("model", help="the .onnx model")
    p.add_argument("out", help="where to write the gradient graph")
    p.add_argument("--layer", action="append", help="a tensor name whose activation and gradient to output (repeatable)")
    p.add_argument("--objective", default="logit", choices=["logit", "softmax", "log_softmax", "chainer_prob_ce"])
    p.add_argument("--no-input-grad", action="store_true", help="only layer gradients (prunes the backward pass)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("C", "H", "W"), help="input size when the model leaves it free")
    p.set_defaults(func=_export_grad)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MultisalError as err:
        print(f"multisal: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
