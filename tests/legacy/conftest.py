"""Tests that run in the legacy environment only (numpy<2, chainer 7.8.1): `make test` builds it as
.venv-legacy and runs `.venv-legacy/bin/python -m pytest -q tests/legacy` before the main tests.

In an environment without chainer (the main one) nothing here is collected, so a plain
`pytest tests` there never trips over `import chainer`.
"""
import importlib.util

if importlib.util.find_spec("chainer") is None:
    collect_ignore_glob = ["*.py"]


def pytest_configure(config):
    # Chainer 7.8.1 imports numpy.distutils and pkg_resources, both deprecated: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:chainer._environment_check")
    config.addinivalue_line("filterwarnings", "ignore:msvccompiler is deprecated:DeprecationWarning")
