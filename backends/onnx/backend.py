"""ONNX adapter for the backend seam: gradient graphs run in onnxruntime.

For each request (objective, layers, input gradient, input shape) the backend builds the model's
gradient graph once (multisal.backends.onnx.grad), caches it on disk keyed by the model's content
and the request, and runs it in onnxruntime: one session run gives the outputs, the gradients and
the activations. The model is prepared once (multisal.backends.onnx.model: read safely, checked,
a fixed batch of 1 rewritten where that is sound, else one image per call).

Models come from a configuration as an .onnx file, "package.module:factory" (returning an .onnx
path or an onnx.ModelProto) or a models/ name, which is exported from PyTorch once and cached.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, List, Optional

import numpy as np

from multisal.backend import Backend, ByteSize, Result, concatenate_results, parse_bytes
from multisal.errors import MultisalError
from multisal.files import is_regular_file, write_atomic
from multisal.frameworks import lazy_import
from multisal.layouts import LayerRecord
from multisal.modelspec import call_factory, model_kind
from multisal.objectives import Detections, Region, check_objective, check_target_range, is_argmax_per_sample
from multisal.registry import register_backend

from .grad.builder import (FLOAT_TYPES, GradientRequest, act_name, build_gradient_model, constant_values, grad_name,
                            graph_input, probe)
from .grad.rules import quantization
from . import runtime
from .grad.objective import BOX_INPUT, CLASS_INPUT, IOU_INPUT, REGION_INPUT, TARGET_INPUT, USED_TARGET
from .model import exported_model, prepare_model

onnx = lazy_import("onnx")
ort = lazy_import("onnxruntime")
helper = lazy_import("onnx.helper")

CPU_MEMORY_BUDGET = 1 << 30
CACHE_FALLBACK = 16 << 20   # the last-level cache assumed where the machine does not say
CACHE_FORMAT = "7"   # bump when the gradient graphs multisal writes change


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "multisal" / "onnx"


def last_level_cache_bytes(folder="/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest CPU cache of this machine, from Linux's sysfs; CACHE_FALLBACK where it says nothing."""
    sizes = []
    for entry in Path(folder).glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes, default=CACHE_FALLBACK)


# Node types whose output is kind "norm" or "softmax" for layout recognition (multisal.layouts).
NORM_OPS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                      "SkipLayerNormalization", "BatchNormalization", "GroupNormalization", "InstanceNormalization"})


def _channels_last(model, shapes):
    """Names of 4-D tensors laid out (N, H, W, C): a Transpose's output with perm [0, 2, 3, 1], and
    what a node makes of such a tensor (its first input) keeping the leading (N, H, W): ConvNeXt's
    and Swin's LayerNorm, Linear and GELU on channels-last maps, whose last two axes (W, C) would
    otherwise pass for a spatial size."""
    found = set()
    for node in model.graph.node:
        if node.op_type == "Transpose":
            perm = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
            if perm == [0, 2, 3, 1]:
                found.add(node.output[0])
        elif node.input and node.input[0] in found:
            found.update(o for o in node.output if len(shapes.get(o, ())) == 4
                         and shapes[o][:3] == shapes[node.input[0]][:3])
    return found


@register_backend
class OnnxBackend(Backend):
    name = "onnx"
    framework = ("onnxruntime", "onnx")
    install = "pip install 'multisal[onnx]'"
    model_files = {".onnx": "an .onnx model"}

    def __init__(self, model, providers: Optional[Annotated[List[str], "a list of onnxruntime provider names"]] = None,
                 threads: Optional[int] = None,
                 cache_dir: Optional[str] = None, preset=None, memory_budget: Optional[ByteSize] = None):
        prepared = prepare_model(model)
        available_providers = ort.get_available_providers()
        if providers is not None and (isinstance(providers, str) or not list(providers)):
            raise MultisalError(f"providers={providers!r}: expected a non-empty list of onnxruntime provider names, "
                                f"from {', '.join(available_providers)}")
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
                if "CUDAExecutionProvider" in available_providers else ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available_providers]
        if unknown:
            raise MultisalError(f"onnxruntime provider {unknown[0]!r} is not available here: available are "
                                f"{', '.join(available_providers)}")
        self.providers = list(providers)
        self.threads = threads
        self.preset = preset
        self.memory_budget = parse_bytes(memory_budget) if memory_budget is not None else CPU_MEMORY_BUDGET
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.source = prepared.source
        self.input_name = prepared.input_name
        self._input_dims = prepared.input_dims
        self.batch_one = prepared.batch_one
        self.model = prepared.model
        # Inputs are fed in the model's own type (float16 for a half-precision model); what comes
        # back is float32 (as_float32), what the methods compute in.
        self.input_dtype = helper.tensor_dtype_to_np_dtype(graph_input(self.model).type.tensor_type.elem_type)
        self._digest = hashlib.sha256(self.model.SerializeToString()).hexdigest()
        self._sessions = {}
        self._cache_on_disk = True   # a randomized() copy keeps its gradient graphs in memory only
        self._probes = {}
        self._quantised = None
        self._sample_bytes = {}

    # ---- from a configuration ------------------------------------------------------------------
    @classmethod
    def open_model(cls, spec, weights=None, sample_shape=(3, 224, 224)):
        kind = model_kind(spec)
        if kind == "name":
            return str(exported_model(spec, weights, sample_shape=tuple(sample_shape)))
        if kind in cls.model_files:
            return os.path.expanduser(spec)
        if weights is not None:
            raise MultisalError(f"model {spec!r}: the onnx backend takes no weights file (the .onnx holds them)")
        net = call_factory(spec)
        if isinstance(net, os.PathLike):
            net = str(net)
        if not isinstance(net, (str, onnx.ModelProto)):
            raise MultisalError(f"model {spec!r}: the factory returned {type(net).__name__}; the onnx backend needs "
                                "an .onnx path or an onnx.ModelProto (export a torch module with torch.onnx.export)")
        return net

    @classmethod
    def worker_options(cls, options, threads, gpus):
        # onnxruntime's threads are a session option; with onnxruntime-gpu it picks CUDA by itself.
        return {"threads": max(1, int(threads)), **options}

    def describe(self):
        return self.source

    # ---- sessions -----------------------------------------------------------------------------
    def _session(self, model_bytes, what=None):
        return runtime.session(model_bytes, what or self.source, self.providers, self.threads)

    def _request_session(self, request, sample_shape):
        """The session of a request's gradient graph: from the disk cache where a good one is there
        (a cache entry that onnxruntime cannot load, a torn or tampered file, is built again),
        else built and cached."""
        key = (request, tuple(sample_shape))
        if key not in self._sessions:
            digest = hashlib.sha256(f"{self._digest}|{request}|{tuple(sample_shape)}|{CACHE_FORMAT}".encode()).hexdigest()
            path = self.cache_dir / f"{digest}.onnx"
            what = f"the gradient graph of {self.source}"
            if self._cache_on_disk and is_regular_file(path):
                try:
                    self._sessions[key] = self._session(path.read_bytes(), what)
                    return self._sessions[key]
                except (MultisalError, OSError):
                    pass   # rebuilt below, and the cache entry replaced
            grad_model = build_gradient_model(self.model, request, sample_shape, batch=1 if self.batch_one else 2,
                                              source=self.source)
            data = grad_model.SerializeToString()
            self._sessions[key] = self._session(data, what)
            if self._cache_on_disk:
                self._cache(path, data)
        return self._sessions[key]

    def _cache(self, path, data):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError as err:
            raise MultisalError(f"onnx cache_dir {str(self.cache_dir)!r} is not a folder multisal can write to: "
                                f"{err.strerror}") from None

    def _check_shape(self, sample_shape):
        for axis, (want, got) in enumerate(zip(self._input_dims[1:], sample_shape), start=1):
            if want is not None and want != got:
                raise MultisalError(f"{self.source} expects input {self.input_name!r} of shape "
                                    f"{['N', *self._input_dims[1:]]}, got {('N', *sample_shape)} (axis {axis})")
        if len(self._input_dims) != len(sample_shape) + 1:
            raise MultisalError(f"{self.source} expects a {len(self._input_dims)}-D input, got {len(sample_shape) + 1}-D")

    def _probe(self, sample_shape):
        key = tuple(sample_shape)
        if key not in self._probes:
            self._check_shape(key)
            self._probes[key] = probe(self.model, key, 1 if self.batch_one else 2, self.source)
        return self._probes[key]

    def probed(self, sample_shape):
        """(shapes, element types) of every tensor for inputs of this (C, H, W), from one probe run
        (cached); shapes at the batch the gradient graphs are built for."""
        shapes, dtypes, _ = self._probe(sample_shape)
        return shapes, dtypes

    # ---- layers -------------------------------------------------------------------------------
    def layer_names(self):
        return [o for node in self.model.graph.node for o in node.output if o]

    def _parameters(self):
        """{layer (a node's first output): the names of its float initializers of more than one
        value}, for the nodes that have any, in graph order."""
        found = {i.name: i for i in self.model.graph.initializer
                 if i.data_type in FLOAT_TYPES and int(np.prod(i.dims)) > 1}
        layers = {}
        for node in self.model.graph.node:
            names = [name for name in node.input if name in found]
            if names and node.output and node.output[0]:
                layers[node.output[0]] = names
        return layers

    def parameter_layers(self):
        """The nodes that read float initializers (weights, biases, normalisation statistics), named
        by their first output, in graph order."""
        return list(self._parameters())

    def _randomized(self, layers, seed):
        """A copy of the graph in which each initializer of these layers holds its own values in a
        random order (numpy Generator seeded by (seed, the layer's index in parameter_layers())):
        the learned arrangement is gone, the values' distribution (a variance's sign included) stays.
        The copy's gradient graphs are kept in memory, not in the disk cache."""
        parameters = self._parameters()
        index = {name: k for k, name in enumerate(parameters)}
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        tensors = {i.name: i for i in model.graph.initializer}
        for layer in layers:
            rng = np.random.default_rng([seed, index[layer]])
            for name in parameters[layer]:
                values = onnx.numpy_helper.to_array(tensors[name])
                shuffled = rng.permutation(values.reshape(-1)).reshape(values.shape)
                tensors[name].CopyFrom(onnx.numpy_helper.from_array(shuffled, name))
        copy = OnnxBackend(model, providers=self.providers, threads=self.threads, cache_dir=str(self.cache_dir),
                           preset=self.preset, memory_budget=self.memory_budget)
        copy.source = f"{self.source} with {len(layers)} layers randomised"
        copy._cache_on_disk = False
        return copy

    @property
    def input_dims(self):
        """The input's shape as the file declares it (None for free axes), before any batch rewrite."""
        return list(self._input_dims)

    @property
    def sample_shape(self):
        """The (C, H, W) the model declares, with None for free axes."""
        return tuple(self._input_dims[1:])

    def layer_records(self, sample_shape):
        """Every float node output whose first axis is the probe's batch (multisal.layouts.LayerRecord),
        in graph order: normalisations' outputs are kind "norm", Softmax outputs kind "softmax",
        channels-last tensors carry the hint "nhwc"; a record's source is the node's first input
        where a node computes it."""
        shapes, dtypes, _ = self._probe(sample_shape)
        nhwc = _channels_last(self.model, shapes)
        batch = 1 if self.batch_one else 2
        quantised = self.quantised_layers()
        produced = set(self.layer_names())
        records = []
        for node in self.model.graph.node:
            kind = "norm" if node.op_type in NORM_OPS else "softmax" if node.op_type == "Softmax" else ""
            source = node.input[0] if node.input and node.input[0] in produced else None
            for o in node.output:
                shape = shapes.get(o, ())
                if o and (dtypes.get(o) in FLOAT_TYPES or o in quantised) and len(shape) >= 2 and shape[0] == batch:
                    records.append(LayerRecord(o, tuple(shape[1:]), kind, source, "nhwc" if o in nhwc else None))
        return records

    def quantised_layers(self):
        """{tensor: (scale, zero point)}: the integer tensors of a quantised model that stand for real
        values; as layers they are shown as those values (rules/quantization.py)."""
        if self._quantised is None:
            self._quantised = quantization.quantised_tensors(self.model, constant_values(self.model))
        return self._quantised

    def _activation_bytes(self, sample_shape):
        """{tensor: bytes per sample} of every node output, at each tensor's own width."""
        key = tuple(sample_shape)
        if key not in self._sample_bytes:
            shapes, dtypes, _ = self._probe(key)
            activations = set(self.layer_names())
            self._sample_bytes[key] = {name: helper.tensor_dtype_to_np_dtype(dtypes[name]).itemsize
                                       * int(np.prod(s[1:])) for name, s in shapes.items() if name in activations and s}
        return self._sample_bytes[key]

    def sample_bytes(self, sample_shape):
        # The gradient graph keeps the forward's activations and about half as much again.
        return max(1, 3 * sum(self._activation_bytes(sample_shape).values()) // 2)

    def batch_size(self, sample_shape):
        if self.batch_one:
            return 1
        batch = super().batch_size(sample_shape)
        if self.providers[0] == "CPUExecutionProvider":
            # onnxruntime's CPU kernels are fastest while a layer's tensors stay in the last-level
            # cache: a backward step holds about three tensors the size of its activation (incoming
            # gradient, mask or activation, outgoing gradient); past that, each sample costs more
            # (README, "ONNX models"). Autograd, by contrast, gains from larger batches.
            shapes, dtypes, _ = self._probe(sample_shape)
            largest = max((b for name, b in self._activation_bytes(sample_shape).items()
                           if dtypes[name] in FLOAT_TYPES and len(shapes[name]) > 1), default=0)
            batch = min(batch, max(1, last_level_cache_bytes() // max(1, 3 * largest)))
        return batch

    # ---- the seam -----------------------------------------------------------------------------
    def _run(self, x, objective, target, layers, input_grad):
        self._check_shape(x.shape[1:])
        if self.batch_one and len(x) > 1:
            return concatenate_results([self._run(x[i:i + 1], objective, target[i:i + 1] if isinstance(target, np.ndarray)
                                           else target, layers, input_grad) for i in range(len(x))])
        self.check_layers(layers)
        if objective is None:
            return self._forward(x, layers)
        region = isinstance(target, Region)
        output = self.model.graph.output[0].name
        shapes, dtypes, _ = self._probe(x.shape[1:])
        detection = target.decoding(shapes[output]) if isinstance(target, Detections) else None
        request = GradientRequest(layers=tuple(layers), input_grad=bool(input_grad), objective=objective, region=region,
                                  region_axis=target.axis if region else None, detection=detection)
        session = self._request_session(request, x.shape[1:])
        feeds = {self.input_name: self._as_input(x)}
        if region:
            feeds[REGION_INPUT] = target.weights(shapes[output]).astype(helper.tensor_dtype_to_np_dtype(dtypes[output]))
        elif detection is not None:
            float_dtype = helper.tensor_dtype_to_np_dtype(dtypes[output])
            feeds[BOX_INPUT] = target.box_array().astype(float_dtype)
            feeds[IOU_INPUT] = target.iou_array().astype(float_dtype)
            feeds[CLASS_INPUT] = target.class_weights(shapes[output]).astype(float_dtype)
        elif is_argmax_per_sample(target):
            feeds[TARGET_INPUT] = np.full(len(x), -1, np.int64)
        else:
            n_classes = self._probe(x.shape[1:])[0][self.model.graph.output[0].name][1]
            check_target_range(np.asarray(target), n_classes)
            feeds[TARGET_INPUT] = np.asarray(target, np.int64)
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, runtime.run(session, feeds, f"the gradient graph of {self.source}")))
        return Result(outputs=as_float32(values[self.model.graph.output[0].name]),
                      target=values.get(USED_TARGET),
                      input_grad=as_float32(values[grad_name(self.input_name)]) if input_grad else None,
                      activations={n: as_float32(values[act_name(n)]) for n in layers},
                      gradients={n: as_float32(values[grad_name(n)]) for n in layers})

    def _as_input(self, x):
        return x.astype(self.input_dtype, copy=False)

    def _forward(self, x, layers):
        key = ("forward", tuple(layers))
        if key not in self._sessions:
            shapes, dtypes, _ = self._probe(x.shape[1:])
            m = onnx.ModelProto()
            m.CopyFrom(self.model)
            quantised = self.quantised_layers()
            for name in layers:
                shown, dtype = name, dtypes[name]
                if name in quantised:
                    m.graph.node.append(quantization.real_view(name, *quantised[name]))
                    shown, dtype = quantization.REAL_PREFIX + name, dtypes[quantised[name][0]]
                m.graph.output.append(helper.make_tensor_value_info(shown, dtype, ["N", *shapes[name][1:]]))
            self._sessions[key] = self._session(m.SerializeToString())
        session = self._sessions[key]
        values = runtime.run(session, {self.input_name: self._as_input(x)}, self.source)
        n_out = len(self.model.graph.output)
        return Result(outputs=as_float32(values[0]), activations={k: as_float32(v) for k, v in zip(layers, values[n_out:])})

    def _run_replaced(self, x, replace):
        """The model's own forward graph cut at the replaced tensors, which become inputs fed with
        the arrays given; what computed only them is left out (one session per set of tensors)."""
        self._check_shape(x.shape[1:])
        self.check_layers(replace)
        if self.batch_one and len(x) > 1:
            return concatenate_results([self._run_replaced(x[i:i + 1], {k: v[i:i + 1] for k, v in replace.items()})
                                        for i in range(len(x))])
        shapes, dtypes, _ = self._probe(x.shape[1:])
        feeds = {}
        for name, value in replace.items():
            if value.shape[1:] != shapes[name][1:]:
                raise MultisalError(f"replace[{name!r}] has shape {value.shape}; layer {name!r} gives "
                                    f"{('N', *shapes[name][1:])} for these inputs")
            if name in self.quantised_layers():   # given as real values, as the layer is shown
                constants = constant_values(self.model)
                scale, zero_point = self.quantised_layers()[name]
                feeds[name] = quantization.quantise_values(value, constants[scale], constants.get(zero_point, 0),
                                                           dtypes[name])
                continue
            feeds[name] = value.astype(helper.tensor_dtype_to_np_dtype(dtypes[name]), copy=False)
        key = ("replace", tuple(sorted(replace)))
        if key not in self._sessions:
            cut = cut_at(self.model, sorted(replace), shapes, dtypes)
            what = f"{self.source} cut at {', '.join(sorted(replace))}"
            self._sessions[key] = self._session(cut.SerializeToString(), what)
        session = self._sessions[key]
        if self.input_name in {i.name for i in session.get_inputs()}:
            feeds[self.input_name] = self._as_input(x)
        values = runtime.run(session, feeds, self.source)
        return Result(outputs=as_float32(values[0]))


def as_float32(value):
    """A float array of the gradient graph (float16, float64 or float32) as float32, the methods' type."""
    return np.asarray(value).astype(np.float32, copy=False)


def cut_at(model, names, shapes, dtypes):
    """A copy of `model` in which the tensors `names` are graph inputs: their producers' outputs are
    renamed out of the way, and every node no graph output needs is dropped, so nothing that only
    computed a replaced tensor runs. The model's input stays only where a path to an output
    bypasses the cut (a skip connection around it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    cut = set(names)
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out in cut:
                node.output[i] = f"multisal_cut:{out}"
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if needed & set(node.output):
            kept.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    consumed = {name for node in graph.node for name in _reads(node)} | {o.name for o in graph.output}
    inputs = [i for i in graph.input if i.name in consumed]
    del graph.input[:]
    graph.input.extend(inputs)
    graph.input.extend(helper.make_tensor_value_info(name, dtypes[name], ["N", *shapes[name][1:]]) for name in names)
    # Shapes recorded for the cut tensors describe node outputs that are now graph inputs.
    info = [v for v in graph.value_info if v.name not in cut]
    del graph.value_info[:]
    graph.value_info.extend(info)
    return m


def _reads(node):
    """The tensors a node reads: its inputs, and those its subgraphs (If, Loop, Scan bodies) read,
    which may be outer tensors the node's own inputs do not list."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.extend(_reads(inner))
    return names


def export_gradient_graph(src, dst, layers=(), objective="logit", input_grad=True, input_shape=None, region=False):
    """Write the gradient graph of the model at `src` to `dst`: a self-contained .onnx whose inputs are
    the model's input plus the objective's target (int64 per image, -1 = argmax) or region weights,
    and whose outputs are the original outputs, the input gradient ("multisal_grad:<input>") and,
    per layer, the activation ("multisal_act:<layer>") and its gradient ("multisal_grad:<layer>").

    A model with a fixed batch of 1 whose batch rewrite is unsound (see prepare_model) gives a
    gradient graph of batch 1, exactly what the backend runs one image at a time.
    Returns the path written."""
    OnnxBackend.require_framework()
    check_objective(objective)
    prepared = prepare_model(src)
    if input_shape is None:
        if any(d is None for d in prepared.sample_shape):
            raise MultisalError(f"{src} has a free input size {prepared.input_dims}: give input_shape=(C, H, W)")
        input_shape = prepared.sample_shape
    request = GradientRequest(layers=tuple(layers), input_grad=input_grad, objective=objective, region=region)
    grad_model = build_gradient_model(prepared.model, request, tuple(input_shape), batch=1 if prepared.batch_one else 2,
                                      source=prepared.source)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, grad_model.SerializeToString())
    return dst
