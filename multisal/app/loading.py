"""From a backend name and a model, or from a configuration, to a ready backend.

    be = ms.load_backend("torch", model=module, device="cpu")
    be = ms.load_backend("examples/torch.toml")            # or a dict with a config file's keys

A configuration's `model` and `weights` are opened by the chosen backend's class (its open_model:
a models/ name, a model file, or "package.module:factory"), and its table of options ([torch],
[onnx], ...) gives the keywords; its preset (and size) are attached to the backend.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from ..backend import Backend
from ..errors import MultisalError
from ..presets import get_preset
from ..registry import backend_class, backends, create_backend
from .config import load_config


def load_backend(name, model=None, **options) -> Backend:
    """ms.load_backend("torch", model=module, device="cpu") and friends, or
    ms.load_backend(config): a configuration dict or the path of a TOML file (multisal.app.config),
    whose backend, model, weights, preset, size and backend table decide everything."""
    if isinstance(name, Mapping) or isinstance(name, os.PathLike) or (
            isinstance(name, str) and name not in backends() and (name.endswith(".toml") or os.path.isfile(name))):
        if model is not None or options:
            raise MultisalError("load_backend(config) takes no other arguments: put them in the configuration")
        return build_backend(load_config(name))
    return create_backend(name, model, **options)


def build_backend(cfg) -> Backend:
    """The backend a validated configuration describes, with its preset (and size) attached."""
    preset = get_preset(cfg["preset"]).with_options(size=cfg["size"])
    name = cfg["backend"]
    cls = backend_class(name)
    cls.require_framework()   # one line naming what to install, before the model is opened
    weights = os.path.expanduser(cfg["weights"]) if cfg.get("weights") else None
    model = cls.open_model(os.path.expanduser(cfg["model"]), weights, sample_shape=(3, *cfg["size"]))
    return create_backend(name, model, preset=preset, **dict(cfg.get(name, {})))
