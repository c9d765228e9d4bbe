"""What multisal can do with an ONNX model, said before anything is explained: `multisal check
MODEL.onnx` and `ms.check_model(path)`.

The check reads the model as the backend does (multisal.backends.onnx.model.prepare_model: safe
loading, onnx's checker, the batch rewrite and its soundness check), runs one probe where the
input size is known, and walks the path the input gradient would take from the input to the first
output (the nodes the gradient builder would differentiate). Every node on that path is looked up
in the rule registry (grad.context.rule_for), so a rule added in any rules module counts at once.
Where some op on the path has no rule, the gradient methods cannot explain the model through it;
the layer-gradient methods still work at layers after the last such node, and the forward-only
methods (methods.FORWARD_ONLY) at any.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import
from multisal.methods import FORWARD_ONLY, METHODS

from .backend import OnnxBackend
from .grad.builder import gradient_path, graph_input, model_opset
from .grad.context import FLOAT, RULES_OPSET, node_label, rule_for

onnx = lazy_import("onnx")
helper = lazy_import("onnx.helper")

# Exit status of `multisal check` when only the forward-only methods can explain the model.
ONLY_FORWARD_STATUS = 3
NAMES_SHOWN = 5   # node names listed per op without a rule


def type_name(elem_type) -> str:
    """An ONNX element type as numpy spells it (float32, float16, int64, ...)."""
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def declared(value_info) -> Tuple[str, list]:
    """(element type, dims) of a graph input or output as the file declares them; a free axis by
    its name, an unnamed one as '?'."""
    tensor = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim] \
        if tensor.HasField("shape") else None
    return type_name(tensor.elem_type), dims


def _methods(layer: bool):
    """The gradient methods (layer=False) or those that need gradients at a layer only (layer=True)."""
    names = [name for name in METHODS if name not in FORWARD_ONLY]
    if layer:
        names = [name for name in names if "layer" in inspect.signature(METHODS[name]).parameters]
    return names


@dataclass
class ModelCheck:
    source: str
    opset: int
    domains: Dict[str, int]                     # other op domains the model imports -> version
    # (name, element type, declared dims): as the backend runs the model, a fixed batch it rewrote as N
    inputs: List[Tuple[str, str, list]]
    outputs: List[Tuple[str, str, list, Optional[tuple]]]   # ... and the probed shape (None unprobed)
    batch: str                                  # what the backend does with the batch axis
    sample_shape: Optional[tuple]               # the (C, H, W) probed; None where it was not known
    with_rule: Counter = field(default_factory=Counter)                 # op -> nodes on the path
    without_rule: Dict[str, List[str]] = field(default_factory=dict)    # op -> node names on the path
    not_differentiated: Counter = field(default_factory=Counter)        # op -> nodes off the path
    layers_with_gradients: List[str] = field(default_factory=list)      # CAM layers past every rule-less node
    default_layer: Optional[str] = None

    @property
    def gradients_available(self) -> bool:
        """Every op on the input gradient's path has a rule: every method works."""
        return not self.without_rule

    @property
    def exit_status(self) -> int:
        return 0 if self.gradients_available else ONLY_FORWARD_STATUS

    @property
    def methods(self) -> List[str]:
        """The methods that will work on this model (at the default layer for the layer methods)."""
        if self.gradients_available:
            return list(METHODS)
        layer = _methods(layer=True) if self.default_layer in self.layers_with_gradients else []
        return layer + sorted(FORWARD_ONLY, key=list(METHODS).index)

    def lines(self) -> List[str]:
        def shape(dims):
            return "[" + ", ".join(map(str, dims)) + "]" if dims is not None else "(no shape declared)"

        out = [f"model: {self.source}",
               f"opset: {self.opset}" + ("; other domains: " + ", ".join(f"{d} {v}" for d, v in self.domains.items())
                                         if self.domains else "")]
        if self.opset < RULES_OPSET:
            out.append(f"  below opset {RULES_OPSET}: where a rule needs a newer op, the gradient graph is built on "
                       "the model converted by onnx.version_converter (a warning says so when it is)")
        out += [f"input: {name} {kind} {shape(dims)}" for name, kind, dims in self.inputs]
        for name, kind, dims, probed in self.outputs:
            seen = f" (runs as {list(probed)} at the probe's batch)" if probed is not None and \
                (dims is None or len(dims) != len(probed)) else ""
            out.append(f"output: {name} {kind} {shape(dims)}{seen}")
        out.append(f"batch: {self.batch}")
        if self.sample_shape is None:
            out.append("probe: the input size is free; give --shape C H W (input_shape=) to probe it and list layers")
        on_path = sum(self.with_rule.values()) + sum(len(v) for v in self.without_rule.values())
        out.append(f"gradient path from {self.inputs[0][0]} to {self.outputs[0][0]}: {on_path} nodes, "
                   f"{sum(self.with_rule.values())} with a gradient rule")
        if self.with_rule:
            out.append("  with a rule: " + ", ".join(f"{op} {n}" for op, n in self.with_rule.most_common()))
        for op, names in self.without_rule.items():
            shown = ", ".join(repr(n) for n in names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
            out.append(f"  without a rule: {op} {len(names)} ({shown})")
        if self.not_differentiated:
            out.append("not differentiated (shape, integer and constant paths): "
                       + ", ".join(f"{op} {n}" for op, n in self.not_differentiated.most_common()))
        if self.gradients_available:
            out.append("methods: all of them: " + ", ".join(METHODS))
            return out
        out.append("methods: no input gradient (an op on its path has no rule); the forward-only methods work: "
                   + ", ".join(sorted(FORWARD_ONLY, key=list(METHODS).index)))
        if self.layers_with_gradients:
            shown = self.layers_with_gradients[-3:]
            default = f"; the default layer {self.default_layer!r} is among them" \
                if self.default_layer in self.layers_with_gradients else ""
            out.append(f"  the layer-gradient methods ({', '.join(_methods(layer=True))}) work at "
                       f"{len(self.layers_with_gradients)} layers past the nodes without a rule, "
                       f"e.g. {', '.join(map(repr, shown))}{default}")
        return out

    def __str__(self):
        return "\n".join(self.lines())


def _batch_sentence(dims, batch_one) -> str:
    if not dims or dims[0] is None:
        return "free (any batch)"
    if dims[0] == 1 and not batch_one:
        return "fixed at 1 in the file; rewritten to any batch (checked: the same outputs on a batch of 2)"
    if dims[0] == 1:
        return "fixed at 1 and cannot be rewritten soundly: the backend runs one image per call"
    return f"fixed at {dims[0]}"


def _inferred_types(model):
    """Element types from onnx's shape inference, for a model whose input size is not known."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def check_model(path, input_shape=None) -> ModelCheck:
    """What multisal can do with the ONNX model at `path` (see the module docstring); `input_shape`
    (C, H, W) where the model leaves its input size free. print() it for the report; its
    `gradients_available`, `methods` and `without_rule` say the same as data.

    >>> report = ms.check_model("model.onnx")          # doctest: +SKIP
    >>> report.gradients_available, report.without_rule  # doctest: +SKIP
    (False, {'LSTM': ['LSTM_79']})
    """
    OnnxBackend.require_framework()
    bo = OnnxBackend(path)
    model = bo.model
    shape = tuple(input_shape) if input_shape is not None else bo.sample_shape
    if len(shape) != len(bo.sample_shape) or any(not isinstance(d, int) or d < 1 for d in shape if d is not None):
        raise MultisalError(f"input_shape {tuple(shape)} does not fit {bo.describe()}'s input "
                            f"{['N', *bo.sample_shape]}: give (C, H, W) as positive integers")
    probed = None if any(d is None for d in shape) else shape
    output = model.graph.output[0].name
    if probed is not None:
        shapes, dtypes = bo.probed(probed)
    else:
        shapes, known = {}, _inferred_types(model)
        # A tensor inference cannot type (a custom op's output) is taken for float: it may carry a gradient.
        dtypes = {o: known.get(o, FLOAT) for node in model.graph.node for o in node.output if o}
        dtypes.update(known)
    inp = graph_input(model).name
    _, _, active = gradient_path(model.graph, [inp], output, dtypes)
    on_path = {id(node) for node in active}
    report = ModelCheck(
        source=bo.describe(), opset=model_opset(model),
        domains={imp.domain: imp.version for imp in model.opset_import if imp.domain not in ("", "ai.onnx")},
        inputs=[(inp, *declared(graph_input(model)))],
        outputs=[(o.name, *declared(o), shapes.get(o.name)) for o in model.graph.output],
        batch=_batch_sentence(bo.input_dims, bo.batch_one), sample_shape=probed)
    for node in model.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        if id(node) not in on_path:
            report.not_differentiated[op] += 1
        elif rule_for(node) is None:
            report.without_rule.setdefault(op, []).append(node_label(node))
        else:
            report.with_rule[op] += 1
    if probed is not None and bo.candidate_layers(probed):
        report.default_layer = bo.default_layer(probed)
        if report.without_rule:
            report.layers_with_gradients = [
                name for name, _ in bo.candidate_layers(probed)
                if all(rule_for(node) is not None for node in gradient_path(model.graph, [name], output, dtypes)[2])]
    return report
