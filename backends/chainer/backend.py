"""Chainer adapter for the backend seam (the legacy environment: numpy<2, chainer 7.8.1).

Three kinds of model are understood, and their layers keep the names Chainer gives them:

* a link with ``available_layers`` and ``__call__(x, layers=[...])`` returning a dict of named
  Variables, as chainer.links.VGG16Layers, VGG19Layers, ResNet50Layers and GoogLeNet do
  ("conv5_3", "pool5", "fc8", "prob", ...). Their last layer, "prob", is the softmax of the one
  before it, so the model output the objectives see is that one: "fc8" (the logits) for VGG16,
  and objective "chainer_prob_ce" recomputes softmax(fc8) inside the objective, which is exactly
  the write-up's ``softmax_cross_entropy(model(x, layers=['prob'])['prob'], t)``;
* any callable returning a dict (a mapping) of named Variables computed in one forward pass, in
  execution order: the same rule picks the output (the last entry, or the one before a final
  "prob"), and every entry is a layer;
* any other chainer.Link (or callable) returning one Variable, the output: every sub-link's output
  is a layer, recorded with a chainer.LinkHook and named by its path as ``namedlinks`` spells it,
  without the leading slash ("predictor/conv1"; "/predictor/conv1" is accepted too).

``output="name"`` picks another model output for the first two kinds.

Every call runs under ``chainer.using_config('train', False)`` (dropout off, batch statistics
frozen) with backprop enabled only when a gradient is asked for. Gradients come from one
``chainer.grad(outputs=[objective], inputs=[x and/or the layer Variables])`` call: Chainer walks
only the part of the graph between those inputs and the objective, so no parameter gradient is
ever computed and Grad-CAM never differentiates below its layer. The objective is the sum over the
batch of each sample's objective (not Chainer's default mean), so samples stay independent.

Models come from a configuration as "vgg16-chainer" (chainer.links.VGG16Layers with `weights` its
.npz) or "package.module:factory" (a Link; `weights` loaded with chainer.serializers.load_npz).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Optional

import numpy as np

from multisal.backend import Backend, ByteSize, Result, parse_bytes
from multisal.errors import MultisalError
from multisal.frameworks import lazy_import
from multisal.modelspec import call_factory, model_kind
from multisal.objectives import objective_value
from multisal.registry import register_backend

chainer = lazy_import("chainer")
F = lazy_import("chainer.functions")
L = lazy_import("chainer.links")

# Bytes of activations one call may hold. Chainer's CPU convolutions go through im2col, whose
# buffers grow with the batch, so a sample takes longer the more samples share its call (README,
# "Chainer", has the timings): the budget keeps VGG16 at 224x224 at one sample a call (two samples'
# activations, counted twice for the backward pass, exceed it).
CPU_MEMORY_BUDGET = 128 << 20


def _to_numpy(array) -> np.ndarray:
    return np.asarray(chainer.backend.CpuDevice().send(array))


def _default_output(names):
    """The model output among named layers: the last one, or the one before a final softmax 'prob'."""
    if len(names) > 1 and names[-1] == "prob":
        return names[-2]
    return names[-1]


def _recorder(names_by_id, wanted=None):
    """A chainer.LinkHook that records the output Variable of every named sub-link called during
    a forward pass, in the order the calls finish (its `seen`)."""
    class Recorder(chainer.LinkHook):
        name = "multisal_recorder"

        def __init__(self):
            self.seen = []

        def forward_postprocess(self, args):
            name = names_by_id.get(id(args.link))
            if name is not None and (wanted is None or name in wanted):
                self.seen.append((name, args.out))

    return Recorder()


def _replacer(names_by_id, values, device):
    """A chainer.LinkHook that overwrites, in place, the output Variable of each named sub-link with
    values[name] (a LinkHook cannot substitute the Variable a link returns, but in a pass without
    backprop the array it holds may be written before anything downstream reads it)."""
    class Replacer(chainer.LinkHook):
        name = "multisal_replacer"

        def __init__(self):
            self.replaced = set()

        def forward_postprocess(self, args):
            name = names_by_id.get(id(args.link))
            if name is None:
                return
            out, value = args.out, values[name]
            if not isinstance(out, chainer.Variable) or tuple(out.shape) != value.shape:
                raise MultisalError(f"replace[{name!r}] has shape {value.shape}; layer {name!r} gives "
                                    f"{tuple(getattr(out, 'shape', ()))} for these inputs")
            out.array[...] = device.send(value.astype(out.dtype, copy=False))
            self.replaced.add(name)

    return Replacer()


@register_backend
class ChainerBackend(Backend):
    name = "chainer"
    framework = "chainer"
    install = "a legacy environment with numpy<2 and chainer 7.8.1 (see README)"
    devices = "'cpu', '@numpy', '@cupy:0' or '@intel64'"

    def __init__(self, model, output: Optional[str] = None, device: str = "cpu",
                 memory_budget: Optional[ByteSize] = None, preset=None):
        if not callable(model):
            raise MultisalError(f"the chainer backend needs a chainer.Link or a callable chain, got {type(model).__name__}")
        self.model = model
        self.device = self.resolve_device(device)
        if isinstance(model, chainer.Link) and device not in (None, "cpu", "@numpy"):
            model.to_device(self.device)
        self.preset = preset
        self.memory_budget = parse_bytes(memory_budget) if memory_budget is not None else CPU_MEMORY_BUDGET
        self._model_name = type(model).__name__ if isinstance(model, chainer.Link) else (
            getattr(model, "__name__", None) or type(model).__name__)
        if isinstance(model, chainer.Link) and hasattr(model, "available_layers"):
            self.kind = "layers"            # VGG16Layers and friends: model(x, layers=[...])
            self._names = [str(n) for n in model.available_layers]
            if not self._names:
                raise MultisalError(f"{self._model_name}.available_layers is empty")
        else:
            self.kind = None                # decided by the first forward: a dict or one Variable
            self._names = None
        self._links = {}
        if isinstance(model, chainer.Link) and self.kind is None:
            self._links = {path.lstrip("/"): link for path, link in model.namedlinks(skipself=True)}
        if output is not None and not isinstance(output, str):
            raise MultisalError(f"output={output!r} must be a layer name")
        self._output = output
        if output is not None and self.kind == "layers" and output not in self._names:
            raise self.unknown_layer(output)
        self._traces = {}

    def _framework_device(self, device):
        return chainer.get_device("@numpy" if device in (None, "cpu") else device)

    # ---- layers -------------------------------------------------------------------------------
    def describe(self):
        return self._model_name

    def layer_names(self):
        if self.kind == "layers":
            return list(self._names)
        if self._links:
            return list(self._links)
        if self._names is None:
            return []
        return list(self._names)

    @property
    def output_name(self):
        """The named layer used as the model output (None when the model returns one Variable)."""
        if self.kind == "layers" or self.kind == "dict":
            return self._output or _default_output(self._names)
        return None

    def _canonical(self, name):
        if not isinstance(name, str):
            raise MultisalError(f"layer names are strings, got {type(name).__name__} {name!r}")
        if self._links and name not in self._links and name.lstrip("/") in self._links:
            return name.lstrip("/")
        return name

    @property
    def sample_shape(self):
        """A chainer link declares no input size."""
        return None

    @contextmanager
    def _explained(self, shape):
        """Chainer's type check explains a bad input shape over many lines: say it in one."""
        try:
            yield
        except chainer.utils.type_check.InvalidType as err:
            reason = " ".join(str(err).split())
            shown = "(N, " + ", ".join(str(int(d)) for d in shape[1:]) + ")"
            raise MultisalError(f"{self._model_name} rejects inputs of shape {shown}: {reason[:200]}") from None

    def _call(self, xv, wanted=None):
        """Call a model of the second or third kind: (its return value, [(sub-link name, output)])."""
        recorder = _recorder({id(link): name for name, link in self._links.items()}, wanted)
        if self._links:
            with recorder:
                out = self.model(xv)
        else:
            out = self.model(xv)
        if isinstance(out, Mapping):
            names = [str(k) for k in out]
            if not names:
                raise MultisalError(f"{self._model_name} returned an empty dict")
            if self.kind != "dict":
                self.kind, self._links = "dict", {}
            self._names = names
            if self._output is not None and self._output not in names:
                raise self.unknown_layer(self._output)
        elif isinstance(out, chainer.Variable):
            if self.kind is None and self._output is not None:
                raise MultisalError(f"output={self._output!r}: {self._model_name} returns one Variable, not named outputs")
            self.kind = "variable"
        else:
            raise MultisalError(f"{self._model_name} returns {type(out).__name__}; the chainer backend needs a model "
                                "returning one Variable or a dict of named Variables")
        return out, recorder.seen

    def _forward(self, xv, layers):
        """One forward pass: (output Variable, {layer: Variable}) for the requested layers."""
        if self.kind == "layers":
            for name in layers:
                if name not in self._names:
                    raise self.unknown_layer(name)
            out_name = self.output_name
            res = self.model(xv, layers=list(dict.fromkeys([out_name, *layers])))
            return res[out_name], {n: res[n] for n in layers}
        for name in layers:
            if self.kind == "variable" and name not in self._links:
                raise self.unknown_layer(name)
        out, seen = self._call(xv, set(layers))
        if self.kind == "dict":
            for name in layers:
                if name not in out:
                    raise self.unknown_layer(name)
            return out[self.output_name], {n: out[n] for n in layers}
        for name in layers:
            if name not in self._links:
                raise self.unknown_layer(name)
        captured = dict(seen)   # a link called twice: its last call, as the torch backend does
        missing = [n for n in layers if n not in captured]
        if missing:
            raise MultisalError(f"layer {missing[0]!r} did not run in the forward pass")
        return out, captured

    def _trace(self, sample_shape):
        """([(name, shape without batch, bytes)] of the named activations up to the output, in
        execution order, the output's shape, its bytes) for one zero input. Cached per shape."""
        key = tuple(sample_shape)
        if key not in self._traces:
            xv = chainer.Variable(self.device.send(np.zeros((1, *key), np.float32)))
            with chainer.using_config("train", False), chainer.no_backprop_mode(), self._explained((1, *key)):
                if self.kind == "layers":
                    res = self.model(xv, layers=list(self._names))
                    out = res[self.output_name]
                    stop = self._names.index(self.output_name)
                    seen = [(n, res[n]) for n in self._names[:stop + 1] if n in res]
                else:
                    ret, recorded = self._call(xv)
                    if self.kind == "dict":
                        out = ret[self.output_name]
                        seen = list(ret.items())[:self._names.index(self.output_name) + 1]
                    else:
                        out = ret
                        # A chain returns its last child's Variable: keep the innermost name per Variable.
                        first = {}
                        for name, v in recorded:
                            first.setdefault(id(v), name)
                        seen = [(n, v) for n, v in recorded if first[id(v)] == n]
            shapes = [(n, tuple(v.shape[1:]), v.array.nbytes) for n, v in seen if isinstance(v, chainer.Variable)]
            self._traces[key] = (shapes, tuple(out.shape), out.array.nbytes)
        return self._traces[key]

    def candidate_layers(self, sample_shape):
        """[(layer name, shape without batch)] of 4-D activations with spatial size > 1 up to the model
        output, in execution order: the layers Grad-CAM can use."""
        shapes, _, _ = self._trace(sample_shape)
        return [(n, s) for n, s, _ in shapes if len(s) == 3 and s[1] * s[2] > 1]

    # ---- memory budget ------------------------------------------------------------------------
    def sample_bytes(self, sample_shape):
        shapes, _, out_bytes = self._trace(sample_shape)
        return max(1, 2 * (sum(b for _, _, b in shapes) or out_bytes))

    # ---- the seam -----------------------------------------------------------------------------
    def _run(self, x, objective, target, layers, input_grad):
        canonical = [self._canonical(n) for n in layers]   # results keep the caller's spelling
        want_grad = objective is not None and bool(input_grad or layers)
        with chainer.using_config("train", False), chainer.using_config("enable_backprop", want_grad):
            # With any gradient asked for, x requires grad so that every activation does; chainer.grad
            # still differentiates only between the requested inputs and the objective.
            xv = chainer.Variable(self.device.send(x), requires_grad=want_grad)
            with self._explained(x.shape):
                out, captured = self._forward(xv, canonical)
            result = Result(outputs=_to_numpy(out.array))
            result.activations = {n: _to_numpy(captured[c].array) for n, c in zip(layers, canonical)}
            if objective is None:
                return result
            value, result.target = self._objective(out, objective, target)
            if not want_grad:
                return result
            wrt = ([xv] if input_grad else []) + [captured[c] for c in canonical]
            grads = chainer.grad([value], wrt)
        names = (["input"] if input_grad else []) + list(layers)
        for name, g in zip(names, grads):
            if g is None:
                what = "the input" if name == "input" and input_grad else f"layer {name!r}"
                raise MultisalError(f"the objective does not depend on {what}")
        if input_grad:
            result.input_grad = _to_numpy(grads[0].array)
            grads = grads[1:]
        result.gradients = {n: _to_numpy(g.array) for n, g in zip(layers, grads)}
        return result

    def _run_replaced(self, x, replace):
        """A pass without backprop in which a LinkHook overwrites the replaced sub-links' outputs:
        models of the third kind only (a Link returning one Variable, its layers its sub-links)."""
        if self.kind is None:
            self._trace(x.shape[1:])   # the first forward pass tells which kind of model this is
        if self.kind != "variable":
            raise MultisalError(f"the chainer backend cannot replace a layer's output in {self._model_name}, whose "
                                "layers are computed inside one call: it replaces the outputs of the sub-links of a "
                                "Link returning one Variable")
        values = {self._canonical(n): v for n, v in replace.items()}
        for name in values:
            if name not in self._links:
                raise self.unknown_layer(name)
        hook = _replacer({id(self._links[name]): name for name in values}, values, self.device)
        with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
            xv = chainer.Variable(self.device.send(x), requires_grad=False)
            with hook, self._explained(x.shape):
                out = self.model(xv)
        missing = [name for name in values if name not in hook.replaced]
        if missing:
            raise MultisalError(f"layer {missing[0]!r} did not run in the forward pass")
        return Result(outputs=_to_numpy(out.array))

    def _objective(self, out, objective, target):
        """The sum over the batch of each sample's objective (samples stay independent in eval mode)."""
        return objective_value(_ChainerOps(self.device), out, objective, target)

    # ---- from a configuration ------------------------------------------------------------------
    @classmethod
    def model_problem(cls, spec, weights=None):
        if model_kind(spec) == "name" and spec != "vgg16-chainer":
            return "model", (f"\"{spec}\" is a PyTorch model; backend \"chainer\" runs \"vgg16-chainer\" (weights = a "
                             "Chainer .npz) or \"package.module:factory\"")
        return super().model_problem(spec, weights)

    @classmethod
    def open_model(cls, spec, weights=None, sample_shape=(3, 224, 224)):
        weights = os.path.expanduser(weights) if weights else None
        if model_kind(spec) == "name":
            if weights is None or not os.path.isfile(weights):
                raise MultisalError(f"model 'vgg16-chainer' needs weights = a Chainer VGG_ILSVRC_16_layers.npz; "
                                    f"{weights!r} not found")
            return L.VGG16Layers(pretrained_model=weights)
        if model_kind(spec) != "factory":
            raise MultisalError(f"model {spec!r}: the chainer backend runs 'vgg16-chainer' or 'package.module:factory'")
        link = call_factory(spec)
        if weights is not None:
            try:
                chainer.serializers.load_npz(weights, link)
            except Exception as err:
                raise MultisalError(f"cannot load weights {weights!r} into {spec!r}: {err}") from None
        return link


class _ChainerOps:
    """The objective's operations (multisal.objectives) on Chainer Variables."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def softmax(x, axis):
        return F.softmax(x, axis=axis)

    @staticmethod
    def log_softmax(x, axis):
        return F.log_softmax(x, axis=axis)

    @staticmethod
    def neg(x):
        return -x

    @staticmethod
    def total(x):
        return F.sum(x)

    @staticmethod
    def argmax(x, axis):
        return _to_numpy(x.array.argmax(axis=axis)).astype(np.int64)

    @staticmethod
    def indices(target):
        return np.asarray(target, dtype=np.int64)

    def one_hot(self, indices, n):
        return self.device.send(np.eye(n, dtype=np.float32)[indices])

    @staticmethod
    def shape(x):
        return tuple(x.shape)

    def constant(self, array):
        return self.device.send(np.asarray(array))

    @staticmethod
    def take(x, axis, start, stop):
        return x[(slice(None),) * axis + (slice(start, stop),)]

    @staticmethod
    def mul(a, b):
        # Chainer's arithmetic on Variables does not broadcast: the objectness (N, 1, A) times the
        # class scores (N, C, A) of a detection target are broadcast first.
        if isinstance(a, chainer.Variable) or isinstance(b, chainer.Variable):
            if a.shape != b.shape:
                a, b = F.broadcast(a, b)
        return a * b

    # The detection mask's operations, on arrays (stop_gradient leaves the graph).
    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def sub(a, b):
        return a - b

    @staticmethod
    def minimum(a, b):
        return chainer.backend.get_array_module(a).minimum(a, b)

    @staticmethod
    def maximum(a, b):
        return chainer.backend.get_array_module(a).maximum(a, b)

    @staticmethod
    def at_least(a, b):
        return (a >= b).astype(a.dtype)

    @staticmethod
    def stop_gradient(x):
        return x.array
