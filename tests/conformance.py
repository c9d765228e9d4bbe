"""The seam's conformance suite: what multisal.backend asks of every adapter, checked the same way
for each. An adapter's test file gives a Subject (its backend on the reference network, and
probes that read its framework) and subclasses Conformance with a `subject` fixture:

    tests/backends/test_conformance.py    torch, onnx and the NumPy test backend
    tests/legacy/test_chainer_conformance.py    chainer (the legacy environment)

This module imports no framework, so that both environments can import it.

The reference network is tests/numpy_backend.py's classifier (conv1 -> bn1 -> relu1 -> conv2 ->
relu2 -> global average pool -> fc, random weights), which every subject rebuilds in its
framework with the same weights; LAYER, conv2's output, has a conv, a BatchNorm and a ReLU below
it. The checks:
- results agree with the NumPy backend (itself checked against float64 finite differences), for
  every objective and target kind, at the input and at the layers;
- one forward pass per call, and one per chunk when a batch is larger than the backend's batch;
- chunked calls give the whole batch's results;
- no parameter gradient, and the weights are left as they were;
- a layer-only request differentiates nothing below the layer (and the probe that says so does
  see a backward below it when the input gradient is asked for);
- hooks are removed after every call, an error in the middle of the forward pass included, and
  the backend then gives the same results as before;
- an unknown layer, an out-of-range class and a region on a classifier are one-line errors.
"""
from contextlib import contextmanager

import numpy as np
import pytest

import multisal as ms
import numpy_backend as nb
from helpers import assert_agree
from multisal.backend import even_chunks

SAMPLE = (3, 8, 8)
LAYER = "conv2"
# The reference network's layers every adapter names alike (Chainer names links only, no ReLUs).
SHARED_LAYERS = ("conv1", "bn1", "conv2")
CLASSES = 5


def reference_net():
    return nb.classifier(classes=CLASSES)


def reference_params():
    """{"conv1.weight": array, ..., "bn1.mean": ..., "bn1.var": ..., "fc.bias": ...} in float64."""
    return reference_net().params()


def reference_eps():
    return dict(reference_net().layers)["bn1"].eps


def inputs(n=5, seed=1):
    rng = np.random.default_rng(seed)
    # Per-image offsets, so that the images' top classes differ.
    return (rng.standard_normal((n, *SAMPLE)) + 1.5 * rng.standard_normal((n, SAMPLE[0], 1, 1))).astype(np.float32)


class Subject:
    """One adapter under the suite. `backend` makes a backend on the subject's one model, so that
    the probes, which watch the model, see every backend made from it."""

    name = "adapter"
    is_reference = False   # the NumPy backend: the suite compares the others with it

    def backend(self, memory_budget=None) -> ms.Backend:
        raise NotImplementedError

    def forward_passes(self) -> int:
        """How many forward passes the model has run so far, as the framework counts them."""
        raise NotImplementedError

    @contextmanager
    def differentiated_below(self):
        """Yields a list, filled on exit with what the calls in the block differentiated below
        LAYER (empty: nothing)."""
        raise NotImplementedError

    @contextmanager
    def parameter_gradients(self):
        """Yields a list, filled on exit with every parameter gradient the calls in the block
        formed (and every parameter whose requires-grad state they changed)."""
        raise NotImplementedError

    def parameters(self) -> dict:
        """{name: a copy of the array} of the model's weights and running statistics."""
        raise NotImplementedError

    def hooks(self):
        """A comparable snapshot of every hook installed on the model or in the framework."""
        raise NotImplementedError

    @contextmanager
    def failing(self):
        """The model's forward pass raises inside the block, after LAYER has run."""
        raise NotImplementedError


def _requests(n):
    """(objective, target, layers, input_grad) of the kinds of call the methods make."""
    t = np.arange(n) % CLASSES
    return [(None, None, [LAYER], False),
            ("logit", t, [], True),
            ("softmax", ms.ARGMAX_PER_SAMPLE, [LAYER], False),
            ("log_softmax", t, [LAYER, "conv1"], True),
            ("chainer_prob_ce", ms.ARGMAX_PER_SAMPLE, [LAYER], True)]


def _run(be, x, request):
    objective, target, layers, input_grad = request
    return be.run(x, objective, target, layers=layers, input_grad=input_grad)


def _assert_same(actual, expected, layers):
    assert_agree(actual.outputs, expected.outputs)
    for name in ("input_grad", "target"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (e is None), name
        if name == "target" and e is not None:
            np.testing.assert_array_equal(a, e)
        elif e is not None:
            assert_agree(a, e)
    assert set(actual.activations) == set(expected.activations) == set(layers)
    assert set(actual.gradients) == set(expected.gradients)
    for name in layers:
        assert_agree(actual.activations[name], expected.activations[name])
        if name in expected.gradients:
            assert_agree(actual.gradients[name], expected.gradients[name])


class Conformance:
    """The suite; a test file subclasses it as Test... and gives a `subject` fixture."""

    def test_results_agree_with_the_reference_backend(self, subject):
        if subject.is_reference:
            pytest.skip("the reference itself (tests/core/test_numpy_backend.py checks it against finite differences)")
        be, ref = subject.backend(), nb.NumpyBackend(reference_net())
        x = inputs()
        for objective in ms.OBJECTIVES:
            for target in (np.array([4, 0, 3, 1, 2]), ms.ARGMAX_PER_SAMPLE):
                request = (objective, target, list(SHARED_LAYERS), True)
                _assert_same(_run(be, x, request), _run(ref, x, request), SHARED_LAYERS)
        _assert_same(be.run(x, layers=SHARED_LAYERS), ref.run(x, layers=SHARED_LAYERS), SHARED_LAYERS)
        assert be.default_layer(SAMPLE) in be.layer_names() and LAYER in dict(be.candidate_layers(SAMPLE))

    def test_one_forward_pass_per_call(self, subject):
        be = subject.backend()
        x = inputs()
        assert be.batch_size(SAMPLE) >= len(x)
        calls = [lambda r=r: _run(be, x, r) for r in _requests(len(x))]
        calls += [lambda: ms.vanilla_gradient(be, x), lambda: ms.gradcam(be, x, layer=LAYER)]
        for call in calls:
            # The first call of a kind may set up what later ones reuse (a sizing pass on a zero
            # input, a gradient graph, a BatchNorm fold checked against the model): the contract
            # is about the calls themselves.
            call()
            before = subject.forward_passes()
            call()
            assert subject.forward_passes() - before == 1

    def test_a_batch_larger_than_the_backend_batch_runs_in_chunks_with_the_same_results(self, subject):
        whole = subject.backend()
        be = subject.backend(memory_budget=2 * whole.sample_bytes(SAMPLE))
        x = inputs()
        assert be.batch_size(SAMPLE) == 2
        chunks = len(even_chunks(len(x), 2))
        for request in _requests(len(x)):
            _run(be, x, request)
            before = subject.forward_passes()
            chunked = _run(be, x, request)
            assert subject.forward_passes() - before == chunks
            _assert_same(chunked, _run(whole, x, request), request[2])
        one_by_one = [_run(whole, x[i:i + 1], ("softmax", np.array([i]), [LAYER], True)) for i in range(len(x))]
        chunked = _run(be, x, ("softmax", np.arange(len(x)), [LAYER], True))
        assert_agree(chunked.input_grad, np.concatenate([r.input_grad for r in one_by_one]))
        assert_agree(chunked.gradients[LAYER], np.concatenate([r.gradients[LAYER] for r in one_by_one]))

    def test_no_parameter_gradient_and_the_weights_unchanged(self, subject):
        be = subject.backend()
        x = inputs()
        before = subject.parameters()
        with subject.parameter_gradients() as found:
            for request in _requests(len(x)):
                _run(be, x, request)
            ms.gradcam(be, x, layer=LAYER)
        assert found == []
        after = subject.parameters()
        assert set(after) == set(before) and before
        for name in before:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)

    def test_a_layer_request_differentiates_nothing_below_the_layer(self, subject):
        be = subject.backend()
        x = inputs(3)
        with subject.differentiated_below() as below:
            be.run(x, "softmax", np.array([0, 1, 2]), layers=[LAYER])
            ms.gradcam(be, x, layer=LAYER)
        assert below == []
        # The probe itself: it does see a backward pass below the layer when there is one.
        with subject.differentiated_below() as below:
            be.run(x, "softmax", np.array([0, 1, 2]), layers=[LAYER], input_grad=True)
        assert below != []

    def test_hooks_are_removed_after_every_call_an_error_included(self, subject):
        be = subject.backend()
        x = inputs(3)
        t = np.array([1, 2, 3])
        request = ("logit", t, [LAYER, "conv1"], True)
        clean = _run(be, x, request)
        installed = subject.hooks()
        for r in _requests(len(x)):
            _run(be, x, r)
            assert subject.hooks() == installed
        with subject.parameter_gradients() as found:
            with subject.failing():
                with pytest.raises(Exception):
                    _run(be, x, request)
            assert subject.hooks() == installed
            with pytest.raises(ms.MultisalError, match=f"^target {CLASSES} out of range: the model has {CLASSES} classes"):
                _run(be, x, ("logit", np.array([0, CLASSES, 1]), [LAYER], True))
            assert subject.hooks() == installed
        assert found == []
        _assert_same(_run(be, x, request), clean, request[2])

    def test_an_unknown_layer_is_one_line_naming_the_closest(self, subject):
        be = subject.backend()
        x = inputs(2)
        for wrong, close in (("conv3", "conv2"), ("bn2", "bn1")):
            for call in (lambda: be.run(x, layers=[wrong]), lambda: be.run(x, "logit", np.array([0, 1]), layers=[wrong]),
                         lambda: ms.gradcam(be, x, layer=wrong)):
                with pytest.raises(ms.MultisalError) as info:
                    call()
                message = str(info.value)
                assert "\n" not in message
                assert message.startswith(f"unknown layer {wrong!r} ") and "closest: " in message, message
                assert close in message.split("closest: ", 1)[1].split(", "), message

    def test_a_region_on_a_classifier_is_a_one_line_error(self, subject):
        be = subject.backend()
        with pytest.raises(ms.MultisalError, match="dense output") as info:
            be.run(inputs(2), "logit", ms.region(0, box=(0, 0, 1, 1)), input_grad=True)
        assert "\n" not in str(info.value)
