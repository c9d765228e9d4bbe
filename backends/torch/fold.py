"""Fold eval-mode BatchNorm into the convolution before it, for the torch backend.

In eval mode BatchNorm is a per-channel affine map, so conv followed by BN is one conv with scaled
weights and a shifted bias: the same function, and the same input gradient, with one elementwise
pass fewer in the forward and one in the backward per pair. onnxruntime does this to every ONNX
model; on the CPU it makes SmoothGrad faster (README, "Speed", says by how much on which models).
Float32 rounding moves, as any change of operation order does: measured against float64, the folded
model's gradients are as close as the unfolded model's (tests/backends/torch/test_torch_backend.py).

The model is traced with torch.fx. Convolutions (subclasses included, such as a conv with its own
padding), BatchNorms and the layers a call asks for stay whole modules in the trace, so hooks on
them fire as before; a pair is folded only where the conv's output feeds the BatchNorm alone and
neither is an asked-for layer. A model torch.fx cannot trace is used as it is.
"""
from __future__ import annotations

import copy

from multisal.frameworks import lazy_import

torch = lazy_import("torch")
fx = lazy_import("torch.fx")
nn = lazy_import("torch.nn")


def _trace(model, keep):
    """torch.fx's graph of model with convolutions, BatchNorms and the kept modules as leaves."""
    class Tracer(fx.Tracer):
        def is_leaf_module(self, module, qualified_name):
            return (qualified_name in keep or isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
                    or super().is_leaf_module(module, qualified_name))

    return Tracer().trace(model)


def fold_batchnorm(model, keep=(), folded_convs=None):
    """(a GraphModule computing what model computes, with conv+BatchNorm pairs folded; the number
    of pairs folded). Modules named in `keep` are neither folded nor traced into. The model's own
    modules are shared, except the folded convs, which are new, or taken from `folded_convs` (conv
    name -> folded conv, filled as it goes), so variants for other `keep`s share them. Raises what
    torch.fx raises when the model cannot be traced."""
    keep = set(keep)
    folded_convs = {} if folded_convs is None else folded_convs
    graph = _trace(model, keep)
    modules = dict(model.named_modules())
    folded = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules[source.target], nn.Conv2d)):
            continue
        conv, bn = modules[source.target], modules[node.target]
        if bn.training or bn.running_mean is None or {source.target, node.target} & keep:
            continue
        if source.target not in folded_convs:
            folded_convs[source.target] = _folded_conv(conv, bn)
        folded[source.target] = folded_convs[source.target]
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    module = fx.GraphModule(model, graph)
    for name, conv in folded.items():
        module.set_submodule(name, conv)
    module.eval()
    return module, len(folded)


def _folded_conv(conv, bn):
    """A copy of conv computing bn(conv(x)) (bn in eval mode)."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        bias = shift if conv.bias is None else conv.bias * scale + shift
        weight = conv.weight * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
    new = copy.deepcopy(conv)   # same class and attributes (padding, groups...), its own parameters
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.bias = nn.Parameter(bias, requires_grad=False)
    return new
