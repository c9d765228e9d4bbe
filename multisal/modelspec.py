"""How a configuration names a model: a models/ name, a model file, or "package.module:factory".

Each backend decides which of these it opens (Backend.model_problem, Backend.open_model); this
module only tells them apart and calls a factory.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

from . import models
from .errors import MultisalError

FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MODEL_HELP = 'a models/ name (efficientnet-lite0, vgg16-chainer), an .onnx, .pt or .pth file, or "package.module:factory"'


def model_kind(spec):
    """"name" (a models/ name), "factory", or a file's suffix in lower case (".onnx", ".pt", ...);
    None when it is none of them."""
    spec = str(spec)
    if spec in models.names():
        return "name"
    if FACTORY.match(spec):
        return "factory"
    suffix = os.path.splitext(spec)[1].lower()
    return suffix or None


def call_factory(spec):
    """Import "package.module:factory" and return factory(). This runs the user's code: a
    configuration that names a factory is code (see README, "Safety")."""
    module_name, _, attr = str(spec).partition(":")
    # Console scripts do not put the current directory on sys.path; a user's own module lives there.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise MultisalError(f"model {spec!r}: cannot import {module_name!r}: {err}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise MultisalError(f"model {spec!r}: module {module_name!r} has no callable {attr!r}")
    try:
        return factory()
    except Exception as err:
        raise MultisalError(f"model {spec!r}: the factory raised {type(err).__name__}: {err}") from None
