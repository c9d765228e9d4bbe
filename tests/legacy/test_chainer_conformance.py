"""The seam's conformance suite (tests/conformance.py) on the chainer adapter, running the reference
network with the same weights as the NumPy test backend it is compared with. The probes are
Chainer's own: a link hook counting the model's calls, a function hook watching the backward
pass, the parameters' .grad, and the link and function hooks installed."""
from contextlib import contextmanager

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from conformance import Conformance, Subject, reference_eps, reference_params
from layers_protocol import LayersProtocol
from multisal.backends.chainer.backend import ChainerBackend

# The functions whose backward forms a gradient below LAYER (conv2's output): conv2's own, which
# gives relu1's, and conv1's and bn1's. (A ReLU runs above the layer too, so it tells nothing.)
BELOW_LAYER = ("Convolution2DFunction", "FixedBatchNormalization")


class Reference(chainer.Chain):
    """The reference network; its links are its layers (conv1, bn1, conv2, fc)."""

    def __init__(self):
        super().__init__()
        p = reference_params()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 4, 3, pad=1, initialW=p["conv1.weight"], initial_bias=p["conv1.bias"])
            self.bn1 = L.BatchNormalization(4, eps=reference_eps(), initial_gamma=p["bn1.gamma"],
                                            initial_beta=p["bn1.beta"], initial_avg_mean=p["bn1.mean"],
                                            initial_avg_var=p["bn1.var"])
            self.conv2 = L.Convolution2D(4, 6, 3, pad=1, initialW=p["conv2.weight"], initial_bias=p["conv2.bias"])
            self.fc = L.Linear(6, 5, initialW=p["fc.weight"], initial_bias=p["fc.bias"])

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.conv2(h))
        return self.fc(F.average(h, axis=(2, 3)))


class ReferenceLayers(LayersProtocol, Reference):
    """The same network in chainer.links.VGG16Layers' protocol; "fc" is the output the objectives
    see, being the layer before the final softmax "prob"."""

    @property
    def functions(self):
        return {"conv1": [self.conv1], "bn1": [self.bn1], "relu1": [F.relu], "conv2": [self.conv2],
                "relu2": [F.relu], "pool": [lambda h: F.average(h, axis=(2, 3))], "fc": [self.fc],
                "prob": [F.softmax]}


class _CountCalls(chainer.LinkHook):
    name = "count_calls"

    def __init__(self):
        self.calls = 0

    def forward_postprocess(self, args):
        self.calls += 1


class _Fail(chainer.LinkHook):
    name = "fail"

    def forward_preprocess(self, args):
        raise RuntimeError("fc failed (injected by the test)")


class _Backward(chainer.FunctionHook):
    name = "watch_backward"

    def __init__(self):
        self.seen = []

    def backward_preprocess(self, function, in_data, out_grad):
        self.seen.append(function.label)


class ChainerSubject(Subject):
    name = "chainer"

    def __init__(self, model):
        self.model = model
        assert self.model.bn1.avg_mean.dtype == np.float32
        # Chainer starts parameters' gradients as NaN arrays; None is what no gradient looks like.
        self.model.cleargrads()
        self.counter = _CountCalls()
        self.model.add_hook(self.counter)   # local to the model itself: one count per forward pass

    def backend(self, memory_budget=None):
        return ChainerBackend(self.model, memory_budget=memory_budget)

    def forward_passes(self):
        return self.counter.calls

    @contextmanager
    def differentiated_below(self):
        found = []
        with _Backward() as watch:
            yield found
        found += [label for label in watch.seen if label in BELOW_LAYER]

    @contextmanager
    def parameter_gradients(self):
        found = []
        yield found
        found += [name for name, p in self.model.namedparams() if p.grad is not None]

    def parameters(self):
        values = {name: np.array(p.array) for name, p in self.model.namedparams()}
        values.update({"/bn1/avg_mean": self.model.bn1.avg_mean.copy(), "/bn1/avg_var": self.model.bn1.avg_var.copy()})
        return values

    def hooks(self):
        links = tuple((path, tuple(link.local_link_hooks)) for path, link in self.model.namedlinks())
        return links, tuple(chainer._get_link_hooks()), tuple(chainer.get_function_hooks())

    @contextmanager
    def failing(self):
        self.model.fc.add_hook(_Fail())
        try:
            yield
        finally:
            self.model.fc.delete_hook("fail")


@pytest.fixture(params=["chain", "layers protocol"])
def subject(request):
    return ChainerSubject(Reference() if request.param == "chain" else ReferenceLayers())


class TestChainerConformance(Conformance):
    pass
