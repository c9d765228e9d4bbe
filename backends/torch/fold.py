"""Fold eval-mode BatchNorm into the convolution before it, for the torch backend.

In eval mode BatchNorm is a per-channel affine map, so conv followed by BN is one conv with scaled
weights and a shifted bias: the same function, and the same input gradient, with one elementwise
pass fewer in the forward and one in the backward per pair. onnxruntime does this to every ONNX
model; on the CPU it makes SmoothGrad faster (README, "Speed", says by how much on which models).
Float32 rounding moves, as any change of operation order does: measured against float64, the folded
model's gradients are as close as the unfolded model's (tests/backends/torch/test_torch_backend.py).

The model is traced with torch.fx. Convolutions (subclasses included, such as a conv with its own
padding), BatchNorms whose forward is BatchNorm's own and the layers a call asks for stay whole
modules in the trace, so hooks on them fire as before. A BatchNorm subclass with a forward of its
own does more than normalise (timm's BatchNormAct2d also applies its dropout and activation), so
it is traced into: its normalisation becomes an F.batch_norm call, folded like a BatchNorm module,
and what it does after that stays in the graph. A pair is folded only where the conv's output
feeds nothing but the BatchNorm (reading its shape aside), the conv runs once in the graph (a
module called twice would be folded in both places) and neither is an asked-for layer. A model
torch.fx cannot trace is used as it is.

Tracing runs the model's Python with proxies for tensors, and a model may write down what it sees
(LeViT caches its attention biases per device in a dict): every module's attributes are put back as
they were once the trace is done, so the user's model is left as it was.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager

from multisal.frameworks import lazy_import

torch = lazy_import("torch")
fx = lazy_import("torch.fx")
nn = lazy_import("torch.nn")
F = lazy_import("torch.nn.functional")

# What a node may read off the conv's output without depending on its values: the folded conv's
# output has the same shape, type and device.
_METADATA_ATTRIBUTES = {"ndim", "shape", "dtype", "device", "is_cuda"}
_METADATA_METHODS = {"size", "dim"}


def _plain_batchnorm(module):
    """A BatchNorm whose forward is BatchNorm's own: it normalises and does nothing else."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and type(module).forward is nn.modules.batchnorm._BatchNorm.forward)


def _trace(model, keep):
    """torch.fx's graph of model with convolutions, plain BatchNorms and the kept modules as leaves."""
    class Tracer(fx.Tracer):
        def is_leaf_module(self, module, qualified_name):
            if qualified_name in keep or isinstance(module, nn.Conv2d) or _plain_batchnorm(module):
                return True
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return False   # torch.nn's own subclasses with a forward of their own (SyncBatchNorm)
            return super().is_leaf_module(module, qualified_name)

    return Tracer().trace(model)


def _snapshot(value):
    """A shallow copy of a container an attribute holds (a cache a forward pass may fill), else None."""
    if isinstance(value, (dict, list, set)):
        return copy.copy(value)
    return None


@contextmanager
def _attributes_kept(model):
    """Every module's attributes (and the contents of the dicts, lists and sets they hold) as they
    were before, once the block is done."""
    saved = [(m, {k: (v, _snapshot(v)) for k, v in vars(m).items()}) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes in saved:
            for key in set(vars(module)) - set(attributes):
                del vars(module)[key]
            for key, (value, contents) in attributes.items():
                vars(module)[key] = value
                if isinstance(value, dict):
                    value.clear()
                    value.update(contents)
                elif isinstance(value, list):
                    value[:] = contents
                elif isinstance(value, set):
                    value.clear()
                    value.update(contents)


def _reads_metadata_only(node):
    return ((node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRIBUTES)
            or (node.op == "call_method" and node.target in _METADATA_METHODS))


def _functional_batchnorm(node, graph_module):
    """(input node, a BatchNorm-like object with running_mean, running_var, weight, bias, eps) of an
    eval-mode F.batch_norm call whose statistics and affine parameters are module attributes, else
    None."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    try:
        bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    args = bound.arguments
    if args["training"] is not False or not isinstance(args["eps"], float):
        return None
    tensors = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        arg = args[name]
        if arg is None and name in ("weight", "bias"):
            tensors[name] = None
        elif isinstance(arg, fx.Node) and arg.op == "get_attr":
            tensors[name] = _attribute(graph_module, arg.target)
        else:
            return None
    return args["input"], _Statistics(**tensors, eps=args["eps"])


def _attribute(root, target):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


class _Statistics:
    """What _folded_conv reads off a BatchNorm, for an F.batch_norm call."""

    def __init__(self, running_mean, running_var, weight, bias, eps):
        self.running_mean, self.running_var, self.weight, self.bias, self.eps = \
            running_mean, running_var, weight, bias, eps


def fold_batchnorm(model, keep=(), folded_convs=None):
    """(a GraphModule computing what model computes, with conv+BatchNorm pairs folded; the number
    of pairs folded). Modules named in `keep` are neither folded nor traced into. The model's own
    modules are shared, except the folded convs, which are new, or taken from `folded_convs` (conv
    name -> folded conv, filled as it goes), so variants for other `keep`s share them. The model's
    attributes are left as they were. Raises what torch.fx raises when the model cannot be traced."""
    keep = set(keep)
    folded_convs = {} if folded_convs is None else folded_convs
    with _attributes_kept(model):
        graph = _trace(model, keep)
        module = _fold_graph(model, graph, keep, folded_convs)
    return module


def _fold_graph(model, graph, keep, folded_convs):
    """fold_batchnorm's work on the traced graph: each BatchNorm (module or F.batch_norm call) that
    reads a foldable conv's output is taken out, and the conv becomes its folded copy."""
    modules = dict(model.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and _plain_batchnorm(modules[node.target]):
            bn = modules[node.target]
            if bn.training or bn.running_mean is None or node.target in keep or node.kwargs or len(node.args) != 1:
                continue
            source, statistics = node.args[0], bn
        else:
            found = _functional_batchnorm(node, model)
            if found is None:
                continue
            source, statistics = found
        if not (isinstance(source, fx.Node) and source.op == "call_module" and source.target not in keep
                and isinstance(modules[source.target], nn.Conv2d) and calls[source.target] == 1
                and all(user is node or _reads_metadata_only(user) for user in source.users)):
            continue
        if source.target not in folded_convs:
            folded_convs[source.target] = _folded_conv(modules[source.target], statistics)
        folded[source.target] = folded_convs[source.target]
        node.replace_all_uses_with(source)
        inputs = [arg for arg in node.all_input_nodes if arg is not source]
        graph.erase_node(node)
        for arg in inputs:   # the statistics' get_attr nodes, now read by nothing
            if arg.op == "get_attr" and not arg.users:
                graph.erase_node(arg)
    result = fx.GraphModule(model, graph)
    for name, conv in folded.items():
        result.set_submodule(name, conv)
    result.eval()
    return result, len(folded)


def _folded_conv(conv, bn):
    """A copy of conv computing bn(conv(x)) (bn in eval mode)."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.weight is not None:    # F.batch_norm takes either affine parameter without the other
            scale, shift = scale * bn.weight, shift * bn.weight
        if bn.bias is not None:
            shift = shift + bn.bias
        bias = shift if conv.bias is None else conv.bias * scale + shift
        weight = conv.weight * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
    new = copy.deepcopy(conv)   # same class and attributes (padding, groups...), its own parameters
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.bias = nn.Parameter(bias, requires_grad=False)
    return new
