"""A backend written outside multisal, in plain NumPy: small networks whose forward pass and
gradients are written out by hand, so the core (methods, noise, the seam's base class, the
application) can be tested without a framework, against closed forms.

It is what a third party writes: one Backend subclass, declared through the public API only, and
one call to ms.register_backend (`register`). The tests register it for one test at a time
(tests/conftest.py, fixture `numpy_backend`), so the other tests see the built-in registry.

The layers compute in float64. Each forms only its input gradient (there is no code for a
parameter gradient), and a backward pass runs from the objective down to the lowest point asked
for (the input, or the lowest requested layer) and no further. A NumpyNet counts its forward
passes and logs which layers it differentiated, which is what the conformance suite reads.
tests/core/test_numpy_backend.py checks every gradient against float64 finite differences.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import multisal as ms
from multisal.backend import ByteSize, parse_bytes
from multisal.errors import MultisalError
from multisal.modelspec import call_factory, model_kind
from multisal.objectives import NumpyOps, target_weights

DEFAULT_MEMORY_BUDGET = 64 << 20


def _frozen(array) -> np.ndarray:
    # Read-only: a layer (or a caller) that wrote into its weights would fail at once.
    a = np.array(array, dtype=np.float64)
    a.setflags(write=False)
    return a


# ---- layers: forward(x) -> y; backward(x, dy) -> dx; out_shape(sample shape) -> sample shape -----
class Conv2d:
    """Stride 1, zero padding `pad` on every side (pad < kernel size)."""

    def __init__(self, weight, bias, pad=1):
        self.weight, self.bias, self.pad = _frozen(weight), _frozen(bias), int(pad)

    def params(self):
        return {"weight": self.weight, "bias": self.bias}

    def out_shape(self, shape):
        _, h, w = shape
        k, _, kh, kw = self.weight.shape
        return (k, h + 2 * self.pad - kh + 1, w + 2 * self.pad - kw + 1)

    def forward(self, x):
        p = self.pad
        windows = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))), self.weight.shape[2:], axis=(2, 3))
        return np.einsum("nchwij,kcij->nkhw", windows, self.weight) + self.bias[:, None, None]

    def backward(self, x, dy):
        # dx is the correlation of dy, zero-padded by k-1-pad, with the kernel flipped in space.
        kh, kw = self.weight.shape[2:]
        ph, pw = kh - 1 - self.pad, kw - 1 - self.pad
        windows = sliding_window_view(np.pad(dy, ((0, 0), (0, 0), (ph, ph), (pw, pw))), (kh, kw), axis=(2, 3))
        return np.einsum("nkhwij,kcij->nchw", windows, self.weight[:, :, ::-1, ::-1])


class BatchNorm:
    """Eval-mode batch normalisation: a per-channel affine map of running statistics."""

    def __init__(self, gamma, beta, mean, var, eps=1e-5):
        self.gamma, self.beta, self.mean, self.var = (_frozen(v) for v in (gamma, beta, mean, var))
        self.eps = float(eps)

    def params(self):
        return {"gamma": self.gamma, "beta": self.beta, "mean": self.mean, "var": self.var}

    def _scale(self):
        return (self.gamma / np.sqrt(self.var + self.eps))[:, None, None]

    def out_shape(self, shape):
        return tuple(shape)

    def forward(self, x):
        return (x - self.mean[:, None, None]) * self._scale() + self.beta[:, None, None]

    def backward(self, x, dy):
        return dy * self._scale()


class ReLU:
    def params(self):
        return {}

    def out_shape(self, shape):
        return tuple(shape)

    def forward(self, x):
        return np.maximum(x, 0)

    def backward(self, x, dy):
        return dy * (x > 0)


class GlobalAvgPool:
    """(N,C,H,W) -> (N,C)."""

    def params(self):
        return {}

    def out_shape(self, shape):
        return tuple(shape[:1])

    def forward(self, x):
        return x.mean(axis=(2, 3))

    def backward(self, x, dy):
        h, w = x.shape[2:]
        return np.broadcast_to(dy[:, :, None, None] / (h * w), x.shape)


class Flatten:
    def params(self):
        return {}

    def out_shape(self, shape):
        return (int(np.prod(shape)),)

    def forward(self, x):
        return x.reshape(len(x), -1)

    def backward(self, x, dy):
        return dy.reshape(x.shape)


class Linear:
    """y = x W^T + b, W of shape (out, in)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = _frozen(weight), _frozen(bias)

    def params(self):
        return {"weight": self.weight, "bias": self.bias}

    def out_shape(self, shape):
        return (self.weight.shape[0],)

    def forward(self, x):
        return x @ self.weight.T + self.bias

    def backward(self, x, dy):
        return dy @ self.weight


# ---- the model -----------------------------------------------------------------------------------
class NumpyNet:
    """Named layers run in order; every layer's output is a layer a call may ask for."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.forward_passes = 0
        self.backward_steps = []   # the layers whose input gradient was formed, in order
        self.fail_at = None        # a layer name: the forward pass raises on reaching it (error paths)

    def names(self):
        return [name for name, _ in self.layers]

    def params(self):
        return {f"{name}.{key}": value for name, layer in self.layers for key, value in layer.params().items()}

    def shapes(self, sample_shape):
        """[(layer, output shape without the batch)], from the layers' geometry alone."""
        out, shape = [], tuple(sample_shape)
        for name, layer in self.layers:
            shape = layer.out_shape(shape)
            out.append((name, shape))
        return out

    def forward(self, x):
        """[the output of each layer] for float64 inputs x: one forward pass."""
        self.forward_passes += 1
        outputs, h = [], x
        for name, layer in self.layers:
            if name == self.fail_at:
                raise RuntimeError(f"layer {name!r} failed (NumpyNet.fail_at)")
            h = layer.forward(h)
            outputs.append(h)
        return outputs

    def backward(self, x, outputs, dy, lowest):
        """{layer index: d objective / d its output} from dy at the last output down to the output of
        layer `lowest` (-1: down to the input, under index -1)."""
        grads = {len(self.layers) - 1: dy}
        for i in range(len(self.layers) - 1, lowest, -1):
            name, layer = self.layers[i]
            self.backward_steps.append(name)
            grads[i - 1] = layer.backward(x if i == 0 else outputs[i - 1], grads[i])
        return grads

    def __call__(self, x):
        return self.forward(np.asarray(x, dtype=np.float64))[-1]


def objective_gradient(scores, weights, objective, axis):
    """d sum(W * f(scores)) / d scores, written out for each objective (f as multisal.objectives
    defines it), with p = softmax(scores) along the class axis."""
    if objective == "logit":
        return weights
    p = NumpyOps.softmax(scores, axis)
    if objective == "softmax":
        return p * (weights - (weights * p).sum(axis, keepdims=True))
    if objective == "log_softmax":
        return weights - p * weights.sum(axis, keepdims=True)
    if objective == "chainer_prob_ce":
        # f = -log_softmax(p): d/dp = -(W - q sum(W)) with q = softmax(p), then back through the softmax.
        q = NumpyOps.softmax(p, axis)
        dp = q * weights.sum(axis, keepdims=True) - weights
        return p * (dp - (dp * p).sum(axis, keepdims=True))
    raise MultisalError(f"unknown objective {objective!r}")


class NumpyBackend(ms.Backend):
    name = "numpy"
    framework = None
    install = ""
    # models/ names are PyTorch and Chainer models; this backend runs NumpyNets from a factory.
    opens_model_names = False

    def __init__(self, model, memory_budget: Optional[ByteSize] = None, float64: bool = False, preset=None):
        if not isinstance(model, NumpyNet):
            raise MultisalError(f"the numpy backend needs a NumpyNet, got {type(model).__name__}")
        self.model = model
        self.memory_budget = parse_bytes(memory_budget) if memory_budget is not None else DEFAULT_MEMORY_BUDGET
        self.float64 = bool(float64)
        self.preset = preset

    @classmethod
    def open_model(cls, spec, weights=None, sample_shape=(3, 224, 224)):
        if model_kind(spec) != "factory":
            raise MultisalError(f"model {spec!r}: backend 'numpy' opens only \"package.module:factory\" returning "
                                "a NumpyNet")
        if weights is not None:
            raise MultisalError(f"model {spec!r}: backend 'numpy' takes no weights file (the factory sets them)")
        net = call_factory(spec)
        if not isinstance(net, NumpyNet):
            raise MultisalError(f"model {spec!r}: the factory returned {type(net).__name__}, not a NumpyNet")
        return net

    def layer_names(self):
        return self.model.names()

    def candidate_layers(self, sample_shape):
        return [(name, shape) for name, shape in self.model.shapes(sample_shape)
                if len(shape) == 3 and shape[1] * shape[2] > 1]

    def sample_bytes(self, sample_shape):
        # float64 outputs of every layer, kept for the backward pass, and as much again for gradients.
        return 2 * 8 * sum(int(np.prod(shape)) for _, shape in self.model.shapes(sample_shape))

    def _out(self, array):
        return np.ascontiguousarray(array, dtype=np.float64 if self.float64 else np.float32)

    def _run(self, x, objective, target, layers, input_grad):
        self.check_layers(layers)
        index = {name: i for i, name in enumerate(self.model.names())}
        x64 = x.astype(np.float64)
        outputs = self.model.forward(x64)
        scores = outputs[-1]
        result = ms.Result(outputs=self._out(scores), activations={n: self._out(outputs[index[n]]) for n in layers})
        if objective is None:
            return result
        weights, result.target, axis = self._weights(scores, target)
        if not (input_grad or layers):
            return result
        lowest = -1 if input_grad else min(index[n] for n in layers)
        grads = self.model.backward(x64, outputs, objective_gradient(scores, weights, objective, axis), lowest)
        if input_grad:
            result.input_grad = self._out(grads[-1])
        result.gradients = {n: self._out(grads[index[n]]) for n in layers}
        return result

    @staticmethod
    def _weights(scores, target):
        """(W, the class index per sample or None, the class axis) for a target of run()."""
        weights, indices, axis = target_weights(NumpyOps, scores, target)
        weights = np.broadcast_to(weights, scores.shape)
        return weights, None if indices is None else np.asarray(indices, dtype=np.int64), axis


def register():
    """Register the backend under its name; returns the class."""
    return ms.register_backend(NumpyBackend)


# ---- factories ("numpy_backend:classifier" in a configuration) --------------------------------------
def _normal(rng, shape, scale):
    return rng.standard_normal(shape) * scale


def classifier(classes=5, seed=0):
    """conv 3x3 (3->4) -> BatchNorm -> ReLU -> conv 3x3 (4->6) -> ReLU -> global average pool ->
    linear (6->classes), with seeded random weights: the conformance suite's reference network."""
    rng = np.random.default_rng(seed)
    return NumpyNet([
        ("conv1", Conv2d(_normal(rng, (4, 3, 3, 3), 0.4), _normal(rng, 4, 0.1))),
        ("bn1", BatchNorm(1 + _normal(rng, 4, 0.2), _normal(rng, 4, 0.1), _normal(rng, 4, 0.1),
                          rng.uniform(0.5, 1.5, 4))),
        ("relu1", ReLU()),
        ("conv2", Conv2d(_normal(rng, (6, 4, 3, 3), 0.3), _normal(rng, 6, 0.1))),
        ("relu2", ReLU()),
        ("pool", GlobalAvgPool()),
        ("fc", Linear(_normal(rng, (classes, 6), 0.5), _normal(rng, classes, 0.1))),
    ])


def linear(sample_shape=(3, 4, 4), classes=5, seed=0):
    """scores = W flatten(x) + b."""
    rng = np.random.default_rng(seed)
    n_in = int(np.prod(sample_shape))
    return NumpyNet([("flat", Flatten()), ("fc", Linear(_normal(rng, (classes, n_in), 0.3), _normal(rng, classes, 0.1)))])


def conv_gap_linear(channels=3, maps=4, classes=3, seed=0):
    """conv 3x3 -> global average pool -> linear: Grad-CAM of layer "conv" has a closed form."""
    rng = np.random.default_rng(seed)
    return NumpyNet([("conv", Conv2d(_normal(rng, (maps, channels, 3, 3), 0.4), _normal(rng, maps, 0.1))),
                     ("pool", GlobalAvgPool()),
                     ("fc", Linear(_normal(rng, (classes, maps), 0.5), _normal(rng, classes, 0.1)))])


def dense(seed=0):
    """conv 3x3 (3->4) -> ReLU -> conv 1x1 (4->2): an (N,2,H,W) output, for region targets."""
    rng = np.random.default_rng(seed)
    return NumpyNet([("conv1", Conv2d(_normal(rng, (4, 3, 3, 3), 0.4), _normal(rng, 4, 0.1))),
                     ("relu1", ReLU()),
                     ("head", Conv2d(_normal(rng, (2, 4, 1, 1), 0.5), _normal(rng, 2, 0.1), pad=0))])
