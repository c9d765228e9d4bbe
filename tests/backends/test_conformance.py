"""The seam's conformance suite (tests/conformance.py) on the torch and onnx adapters and on the
NumPy test backend, each running the reference network with the same weights. Each subject's
probes read its framework: torch's module hooks, parameter flags and autograd; the gradient
graphs onnxruntime runs; the NumPy network's own counters."""
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

import numpy_backend as nb
from conformance import LAYER, SAMPLE, Conformance, Subject, reference_eps, reference_net, reference_params
from multisal.backends.onnx.backend import OnnxBackend
from multisal.backends.onnx.grad.objective import TARGET_INPUT
from multisal.backends.torch.backend import TorchBackend


# ---- torch ---------------------------------------------------------------------------------------
def _torch_net():
    p = reference_params()
    net = torch.nn.Sequential(OrderedDict(
        conv1=torch.nn.Conv2d(3, 4, 3, padding=1), bn1=torch.nn.BatchNorm2d(4, eps=reference_eps()),
        relu1=torch.nn.ReLU(), conv2=torch.nn.Conv2d(4, 6, 3, padding=1), relu2=torch.nn.ReLU(),
        pool=torch.nn.AdaptiveAvgPool2d(1), flat=torch.nn.Flatten(), fc=torch.nn.Linear(6, 5)))
    names = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "mean": "running_mean",
             "var": "running_var"}
    state = {}
    for key, value in p.items():
        layer, field = key.split(".")
        state[f"{layer}.{names[field]}"] = torch.tensor(value, dtype=torch.float32)
    net.load_state_dict(state, strict=False)
    return net.eval()


class TorchSubject(Subject):
    name = "torch"

    def __init__(self):
        self.model = _torch_net()
        # A frozen parameter must stay frozen: the backend turns requires_grad off during a call
        # and has to put back each parameter's own flag, not True for all.
        self.model.bn1.weight.requires_grad_(False)
        self.passes = 0
        # fc runs in the model and in the backend's BatchNorm-folded copy of it, which shares it.
        self.model.fc.register_forward_hook(self._count)

    def _count(self, *_):
        self.passes += 1

    def backend(self, memory_budget=None):
        return TorchBackend(self.model, memory_budget=memory_budget)

    def forward_passes(self):
        return self.passes

    @contextmanager
    def differentiated_below(self):
        found = []
        handle = self.model.relu1.register_full_backward_hook(lambda *_: found.append("relu1's backward ran"))
        try:
            yield found
        finally:
            handle.remove()

    @contextmanager
    def parameter_gradients(self):
        params = dict(self.model.named_parameters())
        flags = {name: p.requires_grad for name, p in params.items()}
        found = []
        handles = [p.register_hook(lambda g, name=name: found.append(f"{name}: gradient formed"))
                   for name, p in params.items() if p.requires_grad]
        try:
            yield found
        finally:
            for h in handles:
                h.remove()
        found += [f"{name}: .grad set" for name, p in params.items() if p.grad is not None]
        found += [f"{name}: requires_grad {flags[name]} -> {p.requires_grad}" for name, p in params.items()
                  if p.requires_grad != flags[name]]

    def parameters(self):
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def hooks(self):
        module = torch.nn.modules.module
        kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        local = [(name, kind, tuple(getattr(m, kind))) for name, m in self.model.named_modules() for kind in kinds]
        world = [tuple(getattr(module, f"_global{kind}")) for kind in kinds]
        return local, world

    @contextmanager
    def failing(self):
        def fail(*_):
            raise RuntimeError("pool failed (injected by the test)")
        handle = self.model.pool.register_forward_pre_hook(fail)
        try:
            yield
        finally:
            handle.remove()


# ---- onnx ----------------------------------------------------------------------------------------
def _onnx_model():
    """The reference network as ONNX nodes whose outputs carry the reference layers' names."""
    p = reference_params()
    init = {"W1": p["conv1.weight"], "B1": p["conv1.bias"], "gamma": p["bn1.gamma"], "beta": p["bn1.beta"],
            "mean": p["bn1.mean"], "var": p["bn1.var"], "W2": p["conv2.weight"], "B2": p["conv2.bias"],
            "Wfc": p["fc.weight"], "Bfc": p["fc.bias"]}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["conv1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["conv1", "gamma", "beta", "mean", "var"], ["bn1"],
                              epsilon=reference_eps()),
             helper.make_node("Relu", ["bn1"], ["relu1"]),
             helper.make_node("Conv", ["relu1", "W2", "B2"], ["conv2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv2"], ["relu2"]),
             helper.make_node("GlobalAveragePool", ["relu2"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "Wfc", "Bfc"], ["fc"], transB=1)]
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(nodes, "reference", [helper.make_tensor_value_info("x", f32, ["N", *SAMPLE])],
                              [helper.make_tensor_value_info("fc", f32, ["N", 5])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _backward_tensors(graph_bytes, feeds):
    """{name: shape} of the float tensors of a gradient graph computed from the objective's target
    input (its backward pass), from an onnxruntime run with every tensor exposed."""
    model = onnx.load_from_string(graph_bytes)
    backward = {TARGET_INPUT}
    for node in model.graph.node:   # nodes come in topological order
        if backward.intersection(node.input):
            backward.update(node.output)
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    outputs = {o.name for o in model.graph.output}
    missing = sorted(n for n in backward if n not in types and n not in outputs and n != TARGET_INPUT)
    assert not missing, f"no type inferred for {missing}: they could not be inspected"
    model.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in sorted(backward)
                              if n in types and n not in outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    return {n: np.shape(v) for n, v in values.items() if n in backward and np.asarray(v).dtype.kind == "f"}


class _CountedSession:
    """An onnxruntime session that counts its runs and remembers the graph and feeds of each."""

    def __init__(self, session, graph_bytes, subject):
        self.session, self.graph_bytes, self.subject = session, graph_bytes, subject

    def run(self, names, feeds, *args, **kwargs):
        if self.subject.fail:
            raise RuntimeError("onnxruntime failed (injected by the test)")
        self.subject.runs.append((self.graph_bytes, feeds))
        return self.session.run(names, feeds, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


class OnnxSubject(Subject):
    name = "onnx"

    def __init__(self, path, cache_dir):
        self.path, self.cache_dir = str(path), cache_dir
        self.runs, self.fail = [], False
        net = reference_net()
        shapes = dict(net.shapes(SAMPLE))
        below = {SAMPLE} | {shapes[n] for n in net.names()[:net.names().index(LAYER)]}
        at_or_above = {shapes[n] for n in net.names()[net.names().index(LAYER):]}
        # A gradient at a tensor below LAYER has its shape; none of these is a shape at or above it.
        self.shapes_below = below - at_or_above

    def backend(self, memory_budget=None):
        be = OnnxBackend(self.path, cache_dir=self.cache_dir, memory_budget=memory_budget)
        # Every session the backend makes goes through its _session: wrap what it returns.
        make = be._session
        be._session = lambda graph_bytes, *what: _CountedSession(make(graph_bytes, *what), graph_bytes, self)
        return be

    def forward_passes(self):
        return len(self.runs)

    @contextmanager
    def _backward_shapes(self):
        """Yields a list, filled on exit with (tensor, batch, its shape, its shape at twice the
        batch) of the backward tensors of every gradient graph run in the block."""
        start = len(self.runs)
        found = []
        yield found
        for graph_bytes, feeds in self.runs[start:]:
            if TARGET_INPUT in feeds:
                shapes = _backward_tensors(graph_bytes, feeds)
                doubled = _backward_tensors(graph_bytes, {k: np.concatenate([v, v]) for k, v in feeds.items()})
                found += [(name, len(feeds[TARGET_INPUT]), shape, doubled[name]) for name, shape in shapes.items()]

    @contextmanager
    def differentiated_below(self):
        found = []
        with self._backward_shapes() as tensors:
            yield found
        found += [f"{name} {shape}" for name, n, shape, _ in tensors if shape[:1] == (n,) and shape[1:] in self.shapes_below]

    @contextmanager
    def parameter_gradients(self):
        found = []
        with self._backward_shapes() as tensors:
            yield found
        # Samples are independent, so the backward pass of an input or activation gradient keeps the
        # batch axis; a tensor whose shape does not grow with the batch sums over the samples, as
        # only a parameter's gradient does.
        found += [f"{name} {shape}" for name, _, shape, doubled in tensors if shape == doubled]

    def parameters(self):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(self.path).graph.initializer}

    def hooks(self):
        return ()   # an onnxruntime session holds nothing between runs

    @contextmanager
    def failing(self):
        self.fail = True
        try:
            yield
        finally:
            self.fail = False


# ---- the NumPy test backend ----------------------------------------------------------------------
class NumpySubject(Subject):
    name = "numpy"
    is_reference = True

    def __init__(self):
        self.model = reference_net()

    def backend(self, memory_budget=None):
        return nb.NumpyBackend(self.model, memory_budget=memory_budget)

    def forward_passes(self):
        return self.model.forward_passes

    @contextmanager
    def differentiated_below(self):
        start, found = len(self.model.backward_steps), []
        yield found
        # A backward step of layer i forms the gradient at the output of layer i - 1.
        depth = self.model.names().index(LAYER)
        found += [s for s in self.model.backward_steps[start:] if self.model.names().index(s) <= depth]

    @contextmanager
    def parameter_gradients(self):
        # The layers have no code for a parameter gradient; their weights are read-only arrays,
        # so that nothing can have written into them either.
        found = []
        yield found
        found += [name for name, p in self.model.params().items() if p.flags.writeable]

    def parameters(self):
        return {k: v.copy() for k, v in self.model.params().items()}

    def hooks(self):
        return ()   # the backend reads the layers' outputs from the forward pass, not through hooks

    @contextmanager
    def failing(self):
        self.model.fail_at = "pool"
        try:
            yield
        finally:
            self.model.fail_at = None


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("conformance") / "reference.onnx"
    onnx.save(_onnx_model(), str(path))
    return path


@pytest.fixture(params=["torch", "onnx", "numpy"])
def subject(request, onnx_path):
    if request.param == "torch":
        return TorchSubject()
    if request.param == "onnx":
        return OnnxSubject(onnx_path, onnx_path.parent / "cache")
    return NumpySubject()


class TestConformance(Conformance):
    pass
