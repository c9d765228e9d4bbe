"""The seam between methods and frameworks.

A backend answers one question for a batch: given inputs x (N,C,H,W float32, already in model
space), an objective and a target, and a list of layer names, return the outputs, d objective / d x
(if asked) and, per layer, the activation A and d objective / d A. Methods only ever see NumPy.

Every backend must:
- run one forward pass per call (the objective lives inside the same pass),
- stop the backward pass where nothing asked for lies further down (Grad-CAM asks for no input
  gradient, so nothing below its layer is differentiated),
- never compute parameter gradients.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np

from .errors import MissingFrameworkError, MultisalError
from .noise import even_chunks
from .objectives import check_objective


@dataclass
class Result:
    outputs: np.ndarray                      # the model's output for the batch
    target: Optional[np.ndarray] = None      # class index used per sample (None for regions / no objective)
    input_grad: Optional[np.ndarray] = None  # d objective / d x, (N,C,H,W)
    activations: Dict[str, np.ndarray] = field(default_factory=dict)
    gradients: Dict[str, np.ndarray] = field(default_factory=dict)


class Backend:
    """Base class of the adapters; subclasses implement `_run` and the layer queries."""

    name = "base"
    preset = None   # optional: the preset its inputs use (set by config-driven loading)

    def run(self, x: np.ndarray, objective: Optional[str] = None, target=None,
            layers: Sequence[str] = (), input_grad: bool = False) -> Result:
        """One pass over x. With objective None only outputs and activations are returned.

        target: an int64 array (N,), "argmax" (chosen from this pass's output) or a Region.
        """
        x = check_input(x)
        if objective is not None:
            check_objective(objective)
            if target is None:
                raise MultisalError("run() with an objective needs a target (indices, 'argmax' or a region)")
        elif input_grad:
            raise MultisalError("an input gradient needs an objective")
        layers = list(layers)
        step = self.batch_size(x.shape[1:])
        if len(x) <= step:
            return self._run(x, objective, target, layers, input_grad)
        # Too many inputs for the memory budget: run in chunks and stitch the results together.
        parts = []
        for start, stop in even_chunks(len(x), step):
            sl = slice(start, stop)
            part_target = target[sl] if isinstance(target, np.ndarray) else target
            parts.append(self._run(x[sl], objective, part_target, layers, input_grad))
        return concatenate_results(parts)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs only (no backward)."""
        return self.run(x).outputs

    def batch_size(self, sample_shape) -> int:
        """How many inputs of this shape one call should carry (memory budget)."""
        return 32

    def layer_names(self) -> list:
        raise NotImplementedError

    def default_layer(self, sample_shape) -> str:
        """The last 4-D activation with spatial size > 1 that feeds the output."""
        raise NotImplementedError

    def _run(self, x, objective, target, layers, input_grad) -> Result:
        raise NotImplementedError


def concatenate_results(parts) -> Result:
    def cat(values):
        return None if values[0] is None else np.concatenate(values)
    first = parts[0]
    return Result(
        outputs=cat([p.outputs for p in parts]),
        target=cat([p.target for p in parts]),
        input_grad=cat([p.input_grad for p in parts]),
        activations={k: cat([p.activations[k] for p in parts]) for k in first.activations},
        gradients={k: cat([p.gradients[k] for p in parts]) for k in first.gradients},
    )


def parse_bytes(budget) -> int:
    """A memory budget: bytes, or a string like '2GiB', '512MB'."""
    if isinstance(budget, (int, float)):
        return int(budget)
    text = str(budget).strip().upper().replace("IB", "B")
    for suffix, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * scale)
            except ValueError:
                break
    raise MultisalError(f"memory_budget {budget!r} is not a size: expected bytes or a string like '2GiB'")


def check_input(x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise MultisalError(f"inputs must be a numpy array (N,C,H,W) float32, got {type(x).__name__}")
    if x.ndim != 4:
        raise MultisalError(f"inputs must have shape (N,C,H,W), got shape {x.shape}; "
                            "use a preset's apply() to turn images into model inputs")
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise MultisalError(f"inputs must be float32, got dtype {x.dtype}; use a preset's apply()")
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise MultisalError("inputs contain NaN or infinite values")
    return np.ascontiguousarray(x)


# name -> (module, class, extra that installs its framework, the framework's import name)
_BACKENDS = {
    "torch": ("multisal.backends.torch_backend", "TorchBackend", "torch", "torch"),
    "onnx": ("multisal.backends.onnx_backend", "OnnxBackend", "onnx", "onnxruntime"),
    "chainer": ("multisal.backends.chainer_backend", "ChainerBackend", None, "chainer"),
}


def require_framework(name) -> None:
    """Fail with one line naming the extra to install when backend `name`'s framework is missing."""
    if not isinstance(name, str) or name not in _BACKENDS:
        raise MultisalError(f"unknown backend {name!r}: expected one of {', '.join(_BACKENDS)}")
    _module, _class, extra, framework = _BACKENDS[name]
    try:
        importlib.import_module(framework)
    except ImportError:
        how = (f"pip install 'multisal[{extra}]'" if extra else
               "a legacy environment with numpy<2 and chainer 7.8.1 (see README)")
        raise MissingFrameworkError(f"backend {name!r} needs {framework}, which is not installed: {how}") from None


def load_backend(name, model=None, **options) -> Backend:
    """ms.load_backend("torch", model=module, device="cpu") and friends, or
    ms.load_backend(config): a configuration dict or the path of a TOML file (multisal.config),
    whose backend, model, weights, preset, size and backend table decide everything."""
    if isinstance(name, Mapping) or isinstance(name, os.PathLike) or (
            isinstance(name, str) and name not in _BACKENDS and (name.endswith(".toml") or os.path.isfile(name))):
        if model is not None or options:
            raise MultisalError("load_backend(config) takes no other arguments: put them in the configuration")
        from .config import load_config
        from .loader import build_backend
        return build_backend(load_config(name))
    require_framework(name)
    module_name, class_name, _extra, _framework = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise MultisalError(f"backend {name!r} is not available in this version of multisal") from None
        raise
    if model is None:
        raise MultisalError(f"load_backend({name!r}) needs model=")
    return getattr(module, class_name)(model, **options)
