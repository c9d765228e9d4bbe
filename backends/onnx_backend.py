"""ONNX adapter for the backend seam: gradient graphs run in onnxruntime.

For each request (objective, layers, input gradient, input shape) the backend builds the model's
gradient graph once (multisal.backends.onnx_grad), caches it on disk keyed by the model's content
and the request, and runs it in onnxruntime: one session run gives the outputs, the gradients and
the activations. Models exported with a fixed batch of 1 are rewritten to take any batch where an
equality check on the rewritten model shows that is sound; otherwise the backend loops.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from multisal.backend import Backend, Result, concatenate_results, parse_bytes
from multisal.errors import MultisalError
from multisal.objectives import ARGMAX, Region, check_target_range
from multisal.render import write_atomic

from .onnx_grad import GradientRequest, build_gradient_model
from .onnx_grad.builder import FLOAT_TYPES, act_name, grad_name, graph_input, probe
from .onnx_grad.objective import REGION_INPUT, TARGET_INPUT, USED_TARGET

CPU_MEMORY_BUDGET = 1 << 30
CACHE_FALLBACK = 16 << 20   # the last-level cache assumed where the machine does not say
CACHE_FORMAT = "3"   # bump when the gradient graphs multisal writes change


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


def load_model(path) -> onnx.ModelProto:
    """Read an .onnx file safely: external data only from inside the model's own folder."""
    path = Path(path)
    if not path.is_file():
        raise MultisalError(f"ONNX model {str(path)!r} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise MultisalError(f"cannot read ONNX model {str(path)!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    folder = path.parent.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if folder not in target.parents or not target.is_file():
            raise MultisalError(f"ONNX model {str(path)!r}: tensor {tensor.name!r} points at external data "
                                f"{location!r} outside the model's folder (or missing); refused")
    onnx.load_external_data_for_model(model, str(folder))
    check_model(model, str(path))
    return model


def check_model(model, source):
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise MultisalError(f"ONNX model {source!r} is not valid: {str(err).strip().splitlines()[0]}") from None


def _static_dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def free_batch(model):
    """A copy whose batch axis is symbolic, with constant Reshape targets of batch 1 made -1, or None
    when the graph cannot be rewritten that way."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in list(m.graph.input[:1]) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    del m.graph.value_info[:]
    consts = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Reshape" and node.input[1] in consts:
            shape = onnx.numpy_helper.to_array(consts[node.input[1]])
            if shape.size and shape[0] == 1:
                if (shape == -1).any():
                    return None
                shape = shape.copy()
                shape[0] = -1
                consts[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(shape, node.input[1]))
    return m


def _channels_last(model, shapes):
    """Names of 4-D tensors laid out (N, H, W, C), which are no Grad-CAM layers: a Transpose's output
    with perm [0, 2, 3, 1], and what a node makes of such a tensor (its first input) keeping the
    leading (N, H, W): ConvNeXt's and Swin's LayerNorm, Linear and GELU on channels-last maps, whose
    last two axes (W, C) would otherwise pass for a spatial size."""
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


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, model, providers=None, threads=None, cache_dir=None, preset=None, memory_budget=None):
        if isinstance(model, onnx.ModelProto):
            check_model(model, "<ModelProto>")
            self.source = "<ModelProto>"
        elif isinstance(model, (str, os.PathLike)):
            self.source = str(model)
            model = load_model(model)
        else:
            raise MultisalError(f"the onnx backend needs a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
                else ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise MultisalError(f"onnxruntime provider {unknown[0]!r} is not available here: available are {', '.join(available)}")
        self.providers = list(providers)
        self.threads = threads
        self.preset = preset
        self.memory_budget = parse_bytes(memory_budget) if memory_budget is not None else CPU_MEMORY_BUDGET
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        inp = graph_input(model)
        self.input_name = inp.name
        self._input_dims = _static_dims(inp)
        self.batch_one = self._input_dims[:1] == [1]
        if self.batch_one:
            rewritten = free_batch(model)
            if rewritten is not None and self._same_outputs(model, rewritten):
                model, self.batch_one = rewritten, False
        self.model = model
        self._digest = hashlib.sha256(model.SerializeToString()).hexdigest()
        self._sessions = {}
        self._probes = {}
        self._batch_sizes = {}

    # ---- sessions -----------------------------------------------------------------------------
    def _session(self, model_bytes):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        return ort.InferenceSession(model_bytes, options, providers=self.providers)

    def _same_outputs(self, original, rewritten):
        """Does the batch-free rewrite give, on a batch of 2, what the original gives one by one?"""
        try:
            dims = [d or 8 for d in self._input_dims[1:]]
            x = np.random.default_rng(0).standard_normal((2, *dims)).astype(np.float32)
            one = self._session(original.SerializeToString())
            two = self._session(rewritten.SerializeToString())
            batched = two.run(None, {self.input_name: x})
            singles = [one.run(None, {self.input_name: x[i:i + 1]}) for i in range(2)]
            return all(np.allclose(b, np.concatenate([s[k] for s in singles]), rtol=1e-4, atol=1e-5)
                       for k, b in enumerate(batched))
        except Exception:   # any failure of the rewritten graph means: keep looping one by one
            return False

    def _request_session(self, request, sample_shape):
        key = (request, tuple(sample_shape))
        if key not in self._sessions:
            digest = hashlib.sha256(f"{self._digest}|{request}|{tuple(sample_shape)}|{CACHE_FORMAT}".encode()).hexdigest()
            path = self.cache_dir / f"{digest}.onnx"
            if path.is_file():
                data = path.read_bytes()
            else:
                grad_model = build_gradient_model(self.model, request, sample_shape, batch=1 if self.batch_one else 2)
                data = grad_model.SerializeToString()
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, data)
            self._sessions[key] = self._session(data)
        return self._sessions[key]

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
            self._probes[key] = probe(self.model, key, 1 if self.batch_one else 2)
        return self._probes[key]

    # ---- layers -------------------------------------------------------------------------------
    def layer_names(self):
        return [o for node in self.model.graph.node for o in node.output if o]

    @property
    def sample_shape(self):
        """The (C, H, W) the model declares, with None for free axes."""
        return tuple(self._input_dims[1:])

    def candidate_layers(self, sample_shape):
        """[(tensor name, shape without batch)] of float 4-D node outputs with spatial size > 1, in
        graph order: the layers Grad-CAM can use."""
        shapes, dtypes, _ = self._probe(sample_shape)
        nhwc = _channels_last(self.model, shapes)
        return [(o, shapes[o][1:]) for node in self.model.graph.node for o in node.output
                if o and dtypes.get(o) in FLOAT_TYPES and len(shapes.get(o, ())) == 4
                and shapes[o][2] * shapes[o][3] > 1 and o not in nhwc]

    def default_layer(self, sample_shape):
        self._check_shape(sample_shape)
        candidates = self.candidate_layers(sample_shape)
        if not candidates:
            raise MultisalError(f"{self.source} has no 4-D activation with spatial size > 1: name a layer")
        return candidates[-1][0]

    def batch_size(self, sample_shape):
        if self.batch_one:
            return 1
        key = tuple(sample_shape)
        if key not in self._batch_sizes:
            shapes, dtypes, _ = self._probe(key)
            activations = set(self.layer_names())
            sample_bytes = {name: helper.tensor_dtype_to_np_dtype(dtypes[name]).itemsize * int(np.prod(s[1:]))
                            for name, s in shapes.items() if name in activations and s}
            batch = max(1, min(256, self.memory_budget // max(1, 3 * sum(sample_bytes.values()) // 2)))
            if self.providers[0] == "CPUExecutionProvider":
                # onnxruntime's CPU kernels are fastest while a layer's tensors stay in the
                # last-level cache: a backward step holds about three tensors the size of its
                # activation (incoming gradient, mask or activation, outgoing gradient). Past that,
                # each sample costs more: EfficientNet-Lite0's gradient graph takes 11 ms a sample
                # at batch 2 and 15 ms at batch 11 on a 32 MiB cache; ResNet-50 is flat.
                largest = max((b for name, b in sample_bytes.items()
                               if dtypes[name] in FLOAT_TYPES and len(shapes[name]) > 1), default=0)
                batch = min(batch, max(1, last_level_cache_bytes() // max(1, 3 * largest)))
            self._batch_sizes[key] = batch
        return self._batch_sizes[key]

    # ---- the seam -----------------------------------------------------------------------------
    def _run(self, x, objective, target, layers, input_grad):
        self._check_shape(x.shape[1:])
        if self.batch_one and len(x) > 1:
            return concatenate_results([self._run(x[i:i + 1], objective, target[i:i + 1] if isinstance(target, np.ndarray)
                                           else target, layers, input_grad) for i in range(len(x))])
        if objective is None:
            return self._forward(x, layers)
        region = isinstance(target, Region)
        request = GradientRequest(layers=tuple(layers), input_grad=bool(input_grad), objective=objective, region=region)
        session = self._request_session(request, x.shape[1:])
        feeds = {self.input_name: x}
        if region:
            shape = self._probe(x.shape[1:])[0][self.model.graph.output[0].name]
            feeds[REGION_INPUT] = target.weights(shape)
        elif isinstance(target, str) and target == ARGMAX:
            feeds[TARGET_INPUT] = np.full(len(x), -1, np.int64)
        else:
            n_classes = self._probe(x.shape[1:])[0][self.model.graph.output[0].name][1]
            check_target_range(np.asarray(target), n_classes)
            feeds[TARGET_INPUT] = np.asarray(target, np.int64)
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, feeds)))
        result = Result(outputs=values[self.model.graph.output[0].name],
                        target=values.get(USED_TARGET),
                        input_grad=values[grad_name(self.input_name)] if input_grad else None,
                        activations={n: values[act_name(n)] for n in layers},
                        gradients={n: values[grad_name(n)] for n in layers})
        return result

    def _forward(self, x, layers):
        key = ("forward", tuple(layers))
        if key not in self._sessions:
            shapes, dtypes, _ = self._probe(x.shape[1:])
            m = onnx.ModelProto()
            m.CopyFrom(self.model)
            for name in layers:
                if name not in shapes:
                    raise MultisalError(f"unknown layer {name!r}: no tensor of that name in {self.source}")
                m.graph.output.append(helper.make_tensor_value_info(name, dtypes[name], ["N", *shapes[name][1:]]))
            self._sessions[key] = self._session(m.SerializeToString())
        session = self._sessions[key]
        values = session.run(None, {self.input_name: x})
        n_out = len(self.model.graph.output)
        return Result(outputs=values[0], activations=dict(zip(layers, values[n_out:])))


def export_gradient_graph(src, dst, layers=(), objective="logit", input_grad=True, input_shape=None, region=False):
    """Write the gradient graph of the model at `src` to `dst`: a self-contained .onnx whose inputs are
    the model's input plus the objective's target (int64 per image, -1 = argmax) or region weights,
    and whose outputs are the original outputs, the input gradient ("multisal_grad:<input>") and,
    per layer, the activation ("multisal_act:<layer>") and its gradient ("multisal_grad:<layer>")."""
    from multisal.objectives import check_objective

    check_objective(objective)
    model = load_model(src)
    dims = _static_dims(graph_input(model))
    if input_shape is None:
        if any(d is None for d in dims[1:]):
            raise MultisalError(f"{src} has a free input size {dims}: give input_shape=(C, H, W)")
        input_shape = tuple(dims[1:])
    batch_one = dims[:1] == [1]
    if batch_one:
        rewritten = free_batch(model)
        if rewritten is not None:
            model, batch_one = rewritten, False
    request = GradientRequest(layers=tuple(layers), input_grad=input_grad, objective=objective, region=region)
    grad_model = build_gradient_model(model, request, tuple(input_shape), batch=1 if batch_one else 2)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, grad_model.SerializeToString())
    return dst
