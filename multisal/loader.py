"""From a configuration's `backend`, `model` and `weights` to a ready backend.

The model can be:
- a models/ name: torch loads it (models.load); onnx exports it once and caches the .onnx
  (models.export_onnx); chainer builds "vgg16-chainer" as chainer.links.VGG16Layers from the .npz;
- "package.module:factory": imported (the current directory is importable, as for `python -m`) and
  called with no arguments; it returns what the backend runs (an nn.Module for torch, an .onnx path
  or ModelProto for onnx, a Link for chainer). With `weights`, a state dict is loaded into it:
  torch.load(weights, weights_only=True) for torch (never unpickling code), load_npz for chainer;
- a TorchScript file (.pt/.pth, torch.jit.load). A plain state dict saved with torch.save holds no
  architecture, so it needs a factory: model = "pkg.mod:factory", weights = "file.pt";
- an .onnx file, for the onnx backend.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping

from .backend import load_backend, require_framework
from .config import model_kind
from .errors import MultisalError


def build_backend(cfg):
    """The backend a validated configuration describes, with its preset (and size) attached."""
    from .models.presets import get_preset
    preset = get_preset(cfg["preset"]).with_options(size=cfg["size"])
    backend = cfg["backend"]
    return open_model(backend, cfg["model"], cfg.get("weights"), cfg.get(backend, {}), preset,
                      sample_shape=(3, *cfg["size"]))


def open_model(backend, model, weights=None, options=None, preset=None, sample_shape=(3, 224, 224)):
    require_framework(backend)   # one line naming the extra, before any framework import below
    kind = model_kind(str(model))
    if kind is None:
        raise MultisalError(f"model {model!r} is none of: a models/ name, an .onnx/.pt/.pth file, 'package.module:factory'")
    if kind in ("onnx", "torchfile"):
        model = os.path.expanduser(model)
    weights = os.path.expanduser(weights) if weights else None
    if backend == "torch":
        net = _torch_model(kind, model, weights)
    elif backend == "onnx":
        net = _onnx_model(kind, model, weights, sample_shape)
    else:
        net = _chainer_model(kind, model, weights)
    return load_backend(backend, model=net, preset=preset, **dict(options or {}))


def call_factory(spec):
    """Import "package.module:factory" and return factory()."""
    module_name, _, attr = spec.partition(":")
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


def _torch_model(kind, model, weights):
    import torch
    from . import models
    if kind == "name":
        return models.load(model, weights)
    if kind == "onnx":
        raise MultisalError(f"model {model!r} is an ONNX file: use backend 'onnx'")
    if kind == "torchfile":
        return _torchscript(model)
    net = call_factory(model)
    if not isinstance(net, torch.nn.Module):
        raise MultisalError(f"model {model!r}: the factory returned {type(net).__name__}; the torch backend needs an nn.Module")
    if weights is not None:
        state = _state_dict(weights)
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise MultisalError(f"weights {weights!r} do not fit {model!r}: {str(err).strip().splitlines()[-1].strip()}") from None
    return net


def _state_dict(path):
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MultisalError(f"weights file {path!r} not found") from None
    except Exception as err:
        raise MultisalError(f"cannot read weights {path!r} as a state dict: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(state, Mapping):
        raise MultisalError(f"weights {path!r} hold a {type(state).__name__}, not a state dict")
    return state


def _torchscript(path):
    import torch
    if not os.path.isfile(path):
        raise MultisalError(f"model file {path!r} not found")
    try:
        script = torch.jit.load(path, map_location="cpu")
    except Exception:
        try:
            is_state = isinstance(torch.load(path, map_location="cpu", weights_only=True), Mapping)
        except Exception:
            is_state = False
        if is_state:
            raise MultisalError(f"model {path!r} is a state dict without an architecture: give "
                                f"model = 'package.module:factory' and weights = {path!r}") from None
        raise MultisalError(f"model {path!r} is neither TorchScript (torch.jit.save) nor a state dict") from None
    return _scripted(script.eval())


def _scripted(script):
    """A TorchScript module behind a plain nn.Module.

    ScriptModules refuse Python forward hooks, and the torch backend hooks every named submodule
    to size its batches and to read layers. Kept out of named_modules(), the script runs whole:
    gradient methods work; CAM methods find no layer to hook and say so. Its parameters are still
    reported (so none gets a gradient) and .to()/.float() still reach it.
    """
    import torch

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "script", script)   # bypasses submodule registration

        def forward(self, x):
            return self.script(x)

        def parameters(self, recurse=True):
            return self.script.parameters(recurse)

        def _apply(self, fn, *args, **kwargs):
            self.script._apply(fn, *args, **kwargs)
            return super()._apply(fn, *args, **kwargs)

    return Scripted()


def _onnx_model(kind, model, weights, sample_shape):
    from . import models
    if kind == "name":
        return str(models.export_onnx(model, weights, sample_shape=tuple(sample_shape)))
    if kind == "onnx":
        return model
    if kind == "torchfile":
        raise MultisalError(f"model {model!r} is a PyTorch file: export it to .onnx, or use backend 'torch'")
    if weights is not None:
        raise MultisalError(f"model {model!r}: the onnx backend takes no weights file (the .onnx holds them)")
    net = call_factory(model)
    if isinstance(net, os.PathLike):
        net = str(net)
    import onnx
    if not isinstance(net, (str, onnx.ModelProto)):
        raise MultisalError(f"model {model!r}: the factory returned {type(net).__name__}; the onnx backend needs "
                            "an .onnx path or an onnx.ModelProto (export a torch module with torch.onnx.export)")
    return net


def _chainer_model(kind, model, weights):
    if kind == "name":
        if model != "vgg16-chainer":
            raise MultisalError(f"model {model!r} is a PyTorch model: the chainer backend runs 'vgg16-chainer' or a factory")
        if weights is None or not os.path.isfile(weights):
            raise MultisalError(f"model 'vgg16-chainer' needs weights = a Chainer VGG_ILSVRC_16_layers.npz; "
                                f"{weights!r} not found")
        import chainer.links as L
        return L.VGG16Layers(pretrained_model=weights)
    if kind != "factory":
        raise MultisalError(f"model {model!r}: the chainer backend runs 'vgg16-chainer' or 'package.module:factory'")
    link = call_factory(model)
    if weights is not None:
        import chainer
        try:
            chainer.serializers.load_npz(weights, link)
        except Exception as err:
            raise MultisalError(f"cannot load weights {weights!r} into {model!r}: {err}") from None
    return link
