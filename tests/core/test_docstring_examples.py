"""The public methods' docstrings: each states its formula, every keyword it takes and what it
returns, and its Example runs under doctest against a tiny random conv net, so the examples
cannot rot.

The examples share one set-up, given to doctest as globals: `ms` (the package), `np`, `be` (a
torch backend over the net below, preset "raw") and `x` (a batch of two 3x32x32 inputs)."""
import doctest
import inspect
import re

import numpy as np
import pytest
import torch

import multisal as ms

# Every method METHODS runs by name (so a new one is held to this without an edit here), and the
# public methods outside it.
PUBLIC_METHODS = {**ms.METHODS, "smooth": ms.smooth, "fooling_image": ms.fooling_image,
                  "class_visualization": ms.class_visualization, "segment": ms.segment}


def _tiny_backend():
    """conv(stride 2)-relu-conv(stride 2)-relu-pool-linear, 5 classes: at 32x32 the default CAM
    layer ("3") is 8x8, so an example can tell layer resolution from input resolution."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    return ms.load_backend("torch", model=net, preset="raw")


@pytest.fixture(scope="module")
def doctest_globals():
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)   # "raw": pixels / 255
    return {"ms": ms, "np": np, "be": _tiny_backend(), "x": x}


def _sections(doc):
    """{"Args": text, "Returns": text, "Example": text, "": the text before them} of a
    Google-style docstring."""
    parts = re.split(r"^(Args|Returns|Example):\s*$", doc, flags=re.M)
    return {"": parts[0], **dict(zip(parts[1::2], parts[2::2]))}


def _arg_entries(args):
    """{name: its entry's text, continuation lines included} of an Args: section ("**name" for
    **kwargs)."""
    entries = re.split(r"^    (?=\S)", args, flags=re.M)[1:]
    return {entry.split(":", 1)[0]: entry for entry in entries}


def test_every_public_method_is_held_to_its_docstring():
    methods = {name for name in ms.__all__ if inspect.isfunction(getattr(ms, name))
               and getattr(ms, name).__module__.startswith(("multisal.methods.", "multisal.noise"))}
    assert methods == set(PUBLIC_METHODS)


@pytest.mark.parametrize("name", PUBLIC_METHODS)
def test_docstring_gives_formula_citation_arguments_and_returns(name):
    fn = PUBLIC_METHODS[name]
    doc = inspect.getdoc(fn) or ""
    sections = _sections(doc)
    assert {"Args", "Returns", "Example"} <= set(sections), f"{name}: needs Args:, Returns: and Example:"
    assert ".. math::" in sections[""], f"{name}: the formula belongs in a `.. math::` block before Args:"
    assert re.search(r"et al\. (19|20)\d\d\)", doc.splitlines()[0]), f"{name}: the summary line cites the paper"
    assert sections["Returns"].strip(), name
    entries = _arg_entries(sections["Args"])
    for param in inspect.signature(fn).parameters.values():
        key = ("**" if param.kind is param.VAR_KEYWORD else "") + param.name
        assert key in entries, f"{name}: Args: has no entry for {key}"
        if param.default is not param.empty:
            assert "default" in entries[key], f"{name}: the entry of {key} does not give its default"
    assert set(entries) <= {("**" if p.kind is p.VAR_KEYWORD else "") + p.name
                            for p in inspect.signature(fn).parameters.values()}, \
        f"{name}: Args: documents a keyword the function does not take"


@pytest.mark.parametrize("name", PUBLIC_METHODS)
def test_docstring_example_runs(name, doctest_globals):
    fn = PUBLIC_METHODS[name]
    tests = doctest.DocTestFinder(recurse=False).find(fn, f"ms.{name}", globs=dict(doctest_globals))
    examples = [ex for t in tests for ex in t.examples]
    assert examples, f"{name} has no >>> example"
    assert any(ex.want.strip() for ex in examples), f"{name}: its example must show an output doctest compares"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} example lines failed (output above)"
