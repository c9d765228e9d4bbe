import os
import sys

import pytest

# Make tests/helpers.py importable as `helpers` whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The shared conformance suite is a plain module: its asserts get pytest's explanations too.
pytest.register_assert_rewrite("conformance")

import numpy_backend  # noqa: E402  (needs the path above)
from multisal import registry  # noqa: E402


@pytest.fixture
def numpy_backend_class(monkeypatch):
    """The NumPy test backend (tests/numpy_backend.py), registered for this test only: the registry is
    a copy that is put back afterwards, so other tests see the built-in backends alone (their error
    messages list them)."""
    registry.backends()   # the built-ins register into the real registry, not into the copy
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    return numpy_backend.register()
