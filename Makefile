# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# The legacy environment: numpy<2 and Chainer 7.8.1 (the Chainer backend and the reference run of
# the Chainer SmoothGrad write-up). Rebuilt only when its requirements change.
LEGACY_VENV := .venv-legacy
LEGACY_PY := $(LEGACY_VENV)/bin/python
LEGACY_PIP := $(LEGACY_PY) -m pip
# The legacy tests write the Chainer reference here; tests/backends/test_chainer_reproduction.py reads it.
LEGACY_REFERENCE := out/legacy-reference

.PHONY: demo test test-legacy bench clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e ".[torch,onnx,ray,dev]"
	touch $@

# Chainer builds from its sdist against the venv's own numpy<2 and setuptools<70 (no build
# isolation); multisal goes in editable without dependencies, then its core dependencies from
# setup.cfg in versions that work with numpy<2 (constraints-legacy.txt).
$(LEGACY_VENV)/.installed: constraints-legacy.txt setup.cfg pyproject.toml
	rm -rf $(LEGACY_VENV)
	$(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_PIP) install -q -c constraints-legacy.txt "numpy<2" "setuptools<70" wheel
	$(LEGACY_PIP) install -q -c constraints-legacy.txt --no-build-isolation chainer==7.8.1
	$(LEGACY_PIP) install -q -c constraints-legacy.txt pytest $$($(LEGACY_PY) -c "import configparser; \
		c = configparser.ConfigParser(); c.read('setup.cfg'); print(' '.join(c['options']['install_requires'].split()))")
	$(LEGACY_PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/multisal demo --out out/demo

test-legacy: $(LEGACY_VENV)/.installed
	MULTISAL_LEGACY_REFERENCE=$(LEGACY_REFERENCE) $(LEGACY_PY) -m pytest -q tests/legacy

test: $(VENV)/.installed test-legacy
	MULTISAL_LEGACY_REFERENCE=$(LEGACY_REFERENCE) $(PY) -m pytest -q tests --ignore=tests/legacy

bench: $(VENV)/.installed
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) $(LEGACY_VENV) out build dist *.egg-info
