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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MultisalError as err:
        print(f"multisal: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
