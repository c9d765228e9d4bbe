"""The backend registry: every backend is one Backend subclass, registered once by its name.

    @ms.register_backend
    class MyBackend(ms.Backend):
        name = "mine"
        ...

A registered backend works everywhere a backend name does, with no other edit: ms.load_backend,
a configuration's `backend` key and its [mine] table (the class's __init__ keywords), `multisal
explain`, `multisal batch` and the Ray engine (which registers it again in each worker).

The built-in backends are registered the same way, by their modules, which are imported the
first time a backend is looked up; importing them imports no framework (multisal.frameworks).
"""
from __future__ import annotations

import importlib
from typing import Dict, Type

from .backend import Backend
from .errors import MultisalError

#: The modules that register the built-in backends, in the order backends are listed.
BUILTIN_BACKEND_MODULES = (
    "multisal.backends.torch.backend",
    "multisal.backends.onnx.backend",
    "multisal.backends.chainer.backend",
)

_REGISTERED: Dict[str, Type[Backend]] = {}
_BUILTINS_LOADED = []


def register_backend(cls):
    """Register a Backend subclass under its `name` (usable as a class decorator); returns it.
    Registering another class under a taken name replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or cls is Backend:
        raise MultisalError(f"register_backend() takes a subclass of multisal.Backend, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name or cls.name == Backend.name:
        raise MultisalError(f"backend class {cls.__name__} needs a name = \"...\" of its own to be registered")
    _REGISTERED[cls.name] = cls
    return cls


def _load_builtins():
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED.append(True)
        for module in BUILTIN_BACKEND_MODULES:
            importlib.import_module(module)


def backends() -> Dict[str, Type[Backend]]:
    """{name: class} of every registered backend, the built-in ones first."""
    _load_builtins()
    builtin = sorted((BUILTIN_BACKEND_MODULES.index(cls.__module__), name) for name, cls in _REGISTERED.items()
                     if cls.__module__ in BUILTIN_BACKEND_MODULES)
    return {**{name: _REGISTERED[name] for _, name in builtin}, **_REGISTERED}


def external_backends() -> Dict[str, Type[Backend]]:
    """The registered backends that are not built in (an engine's workers register them again)."""
    return {name: cls for name, cls in backends().items() if cls.__module__ not in BUILTIN_BACKEND_MODULES}


def backend_class(name) -> Type[Backend]:
    """The class registered as `name`; one line listing the known names otherwise."""
    known = backends()
    if not isinstance(name, str) or name not in known:
        raise MultisalError(f"unknown backend {name!r}: expected one of {', '.join(known)}")
    return known[name]


def create_backend(name, model=None, **options) -> Backend:
    """An instance of backend `name` on `model` with its options, once its framework is there."""
    cls = backend_class(name)
    cls.require_framework()
    if model is None:
        raise MultisalError(f"load_backend({name!r}) needs model=")
    unknown = [k for k in options if k not in cls.options() and k != "preset"]
    if unknown:
        raise MultisalError(f"load_backend({name!r}): unknown option {unknown[0]!r}; "
                            f"backend {name!r} takes {', '.join(cls.options()) or 'no options'}")
    return cls(model, **options)
