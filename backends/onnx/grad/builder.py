"""Reverse-mode differentiation of an ONNX graph, pruned to what was asked.

1. A probe run in onnxruntime records every tensor's shape and type (rules need static shapes for
   things like ConvTranspose's output padding; the batch axis is probed at 2 where it is free).
   Zero Pads that only convolutions read are folded into their pads (fold_pads_into_convs).
2. Forward from the differentiated tensors (the input and/or the layers) mark what depends on them,
   through float tensors and quantised ones (rules/quantization.py: integers that stand for real
   values); other integer and shape paths (Shape, Gather on shapes, Range, Cast to int, ...) never
   carry a gradient.
3. Backward from the explained output keep the nodes on a path between the two; only those are
   differentiated, in reverse order, each by its op's rule, so Grad-CAM writes no backward below
   its layer and no parameter gradient is ever formed.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from multisal.backend import closest_names
from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from .. import runtime
# RULES: the rule registry, filled by the rule modules below, is read from here too (tests, tools).
from .context import (FLOAT, FLOAT_TYPES, INT32, INT64, OBJECTIVE_SCOPE, RULES, RULES_OPSET, GradContext,  # noqa: F401
                      OpsetTooOld, forward_node_name, gradient_scope, node_label, rule_for)
from .objective import build_objective
# Importing a rule module registers its rules; `shape` is the builder's word for a tensor's shape.
from .rules import activations, arithmetic, indexing, linalg, normalization, pooling, recurrent, reductions, resize  # noqa: F401
from .rules import quantization
from .rules import shape as shape_rules

onnx = lazy_import("onnx")
helper = lazy_import("onnx.helper")
version_converter = lazy_import("onnx.version_converter")
numpy_helper = lazy_import("onnx.numpy_helper")

LOG = logging.getLogger("multisal")
# The gradient graph's metadata key that says it was built on a model converted to a newer opset.
OPSET_CONVERSION = "multisal_opset_conversion"
# The opsets a model below RULES_OPSET is converted to, the first that works.
CONVERSION_OPSETS = (11, 13, 17, 21)

INPUT_GRAD_PREFIX = "multisal_grad:"
ACTIVATION_PREFIX = "multisal_act:"


@dataclass(frozen=True)
class GradientRequest:
    layers: Tuple[str, ...] = ()
    input_grad: bool = True
    objective: str = "logit"
    region: bool = False           # the objective's weights come from an input (dense outputs)
    region_axis: Optional[int] = None   # a region's channel axis (multisal.objectives.Region.class_axis)
    # (the axis of an anchor's values, whether they hold an objectness) of a detection target, whose
    # box, IoU threshold and class are inputs; None for other targets
    detection: Optional[Tuple[int, bool]] = None
    output: Optional[str] = None   # the explained graph output; None = the first


def grad_name(tensor):
    return INPUT_GRAD_PREFIX + tensor


def act_name(tensor):
    return ACTIVATION_PREFIX + tensor


def grad_output_node(tensor):
    """The node that puts out a differentiated tensor's gradient; what sums its parts is named
    under it."""
    return f"multisal_grad_out/{tensor}"


def model_opset(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise MultisalError("the model imports no default ONNX opset")


def graph_input(model):
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise MultisalError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                            "multisal explains models with one image input")
    return inputs[0]


def constant_values(model):
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            a = node.attribute[0]
            if a.name == "value":
                values[node.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                values[node.output[0]] = np.asarray(helper.get_attribute_value(a))
    return values


INT_TYPES = {INT64, INT32}
# Element types onnxruntime hands over to numpy as no dtype or as their bytes: INT4, UINT4, INT2,
# UINT2, FLOAT4E2M1 and the float8 types.
UNFETCHED_TYPES = {22, 21, 26, 25, 23, 17, 18, 19, 20}
PROBE_PREFIX = "multisal_probe:"
# Ops whose output depends on their input's shape, not its values; and ops that draw at random.
SHAPE_ONLY_OPS = {"Shape", "Size", "EyeLike"}
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def value_free_tensors(model):
    """The tensors whose values do not depend on the input's values: initializers, Constants,
    Shape and Size outputs, and what is computed from those alone (nodes come in topological order).
    Only these may be taken for constants from a probe run: an ArgMax or TopK index is the same on
    the probe's zero input at every batch size, but not on real inputs."""
    free = {init.name for init in model.graph.initializer}   # Constant nodes pass below: they have no inputs
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue   # a subgraph may read any outer tensor
        if node.op_type in SHAPE_ONLY_OPS or (node.op_type not in RANDOM_OPS
                                              and all(not i or i in free for i in node.input)):
            free.update(o for o in node.output if o)
    return free


def probe(model, sample_shape, batch, source="the model"):
    """Shapes and element types of every tensor, from onnxruntime runs on a zero input; and the
    values of small integer tensors computed from shapes and constants alone that do not change
    with the batch size (pads, shapes and indices computed from the image size), which rules may
    treat as constants.

    Returns (shapes, dtypes, shape_constants); shapes are those of the run at `batch`. `source`
    is how errors name the model (its file), as a model that onnxruntime cannot load or run
    fails here first.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    known = {o.name for o in probe_model.graph.output}
    probed_as = {}   # probe output -> the tensor it shows: UNFETCHED_TYPES come through a Cast to float
    for node in list(probe_model.graph.node):
        for name in node.output:
            if not name or name in known:
                continue
            if types.get(name) in UNFETCHED_TYPES:
                probed_as[PROBE_PREFIX + name] = name
                probe_model.graph.node.append(helper.make_node("Cast", [name], [PROBE_PREFIX + name], to=FLOAT))
                probe_model.graph.output.append(onnx.ValueInfoProto(name=PROBE_PREFIX + name))
            elif types.get(name):
                probe_model.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
            elif name not in types:   # an op onnx does not know (onnxruntime's com.microsoft ones)
                probe_model.graph.output.append(onnx.ValueInfoProto(name=name))
            known.add(name)
    session = runtime.session(probe_model.SerializeToString(), source, optimize=False)
    inp = graph_input(model)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    names = [o.name for o in session.get_outputs()]

    def run(n):
        feeds = {inp.name: np.zeros((n, *sample_shape), dtype=dtype)}
        return dict(zip(names, runtime.run(session, feeds, f"{source} on an input of shape {(n, *sample_shape)}")))

    values = run(batch)
    # A model with a fixed batch only ever sees that batch; otherwise compare two batch sizes.
    dims = inp.type.tensor_type.shape.dim
    fixed = bool(dims) and dims[0].HasField("dim_value")
    other = values if fixed else run(batch + 1)
    shapes, dtypes, shape_constants = {}, {}, {}
    value_free = value_free_tensors(model)
    for name, value in values.items():
        value = np.asarray(value)
        shapes[probed_as.get(name, name)] = tuple(value.shape)
        if name in probed_as:
            name = probed_as[name]
            dtypes[name] = types[name]
            continue
        dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        if dtypes[name] in INT_TYPES and value.size <= 64 and name in value_free \
                and np.array_equal(value, np.asarray(other[name])):
            shape_constants[name] = value
    shapes[inp.name] = (batch, *sample_shape)
    dtypes[inp.name] = inp.type.tensor_type.elem_type
    for name, value in constant_values(model).items():
        shapes[name] = tuple(value.shape)
        dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    return shapes, dtypes, shape_constants


def _batched(shape):
    """A probed shape with its batch axis left free."""
    return ["N", *shape[1:]]


def fold_pads_into_convs(model, ctx, keep=()):
    """A copy of `model` where each zero Pad of the spatial axes whose output only Convs read (as
    their data input) is folded into those Convs' own pads: the same function, but its gradient
    needs no Slice to undo the Pad and no convolution gradient at the padded size, which is
    cropped afterwards. torch's TorchScript exporter writes TF-style "same" padding that way (the
    pads computed at run time from the input's shape, constant for one image size), as in
    EfficientNet-Lite0, whose gradient graph spent a good part of its time in those Pads and the
    Slices undoing them. Nodes left without a reader go too. `keep`: tensors that must stay (asked-for layers)."""
    readers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    keep = set(keep) | {o.name for o in model.graph.output}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = list(result.graph.node)
    by_output = {o: i for i, node in enumerate(nodes) for o in node.output}
    folded = set()
    for node in model.graph.node:
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or node.output[0] in keep:
            continue
        users = readers[node.output[0]]
        if not users or any(u.op_type != "Conv" or list(u.input).count(node.output[0]) != 1 or u.input[0] != node.output[0]
                            or ctx.attr(u, "auto_pad", "NOTSET") != "NOTSET" for u in users):
            continue
        try:
            mode, rank, pads = shape_rules.pad_params(ctx, node)
        except MultisalError:   # pads computed from the input's values: not foldable
            continue
        value = ctx.attr(node, "value", 0.0) if ctx.opset < 11 else \
            (ctx.const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0)
        if mode != "constant" or value is None or np.any(np.asarray(value) != 0) \
                or any(axis < 2 or min(p) < 0 for axis, p in pads.items()):
            continue
        spatial = rank - 2
        for user in users:
            conv = nodes[by_output[user.output[0]]]
            old = list(ctx.attr(conv, "pads", [0] * (2 * spatial)))
            new = [old[d] + pads.get(2 + d, (0, 0))[0] for d in range(spatial)] + \
                  [old[spatial + d] + pads.get(2 + d, (0, 0))[1] for d in range(spatial)]
            for attribute in [a for a in conv.attribute if a.name in ("pads", "auto_pad")]:
                conv.attribute.remove(attribute)
            conv.attribute.append(helper.make_attribute("pads", new))
            conv.input[0] = node.input[0]
        folded.add(node.output[0])
    if not folded:
        return model
    needed, kept = set(keep), []
    for node in reversed(nodes):
        if not folded.intersection(node.output) and any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(node.input)
    del result.graph.node[:]
    result.graph.node.extend(reversed(kept))
    return result


def gradient_path(graph, wrt, output, dtypes):
    """What a gradient of `output` with respect to the tensors `wrt` flows through: (the tensors
    that depend on wrt through float tensors or quantised ones (quantization.carries_gradient), the tensors on a path from wrt to output, the nodes
    on such a path in reverse graph order, the ones to differentiate)."""
    depends = set(wrt)
    for node in graph.node:
        if any(i in depends for i in node.input if i):
            depends.update(o for k, o in enumerate(node.output)
                           if o and quantization.carries_gradient(node, k, dtypes, depends))
    needed, active_nodes = {output}, []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output) and any(i in depends for i in node.input if i):
            active_nodes.append(node)
            needed.update(i for i in node.input if i in depends)
    return depends, needed, active_nodes


def build_gradient_model(model: onnx.ModelProto, request: GradientRequest, sample_shape, batch=2,
                         source="the model") -> onnx.ModelProto:
    """A copy of `model` with the objective, the gradients and the activations as extra outputs
    (`source`: how errors name the model).

    The gradient graph uses only ops of the opset the model declares. Where a rule needs an op
    that opset lacks (below RULES_OPSET), it is built on the model converted to a newer opset by
    onnx's version converter, once the converted model is seen to give the same outputs; the
    graph then says so in its metadata (OPSET_CONVERSION) and a warning on the "multisal" logger."""
    opset = model_opset(model)
    try:
        grad = _gradient_model(model, request, sample_shape, batch, source)
        gap = opset_gap(grad)
    except OpsetTooOld as err:
        gap = str(err)
    if gap is None:
        return grad
    if opset >= RULES_OPSET:
        raise MultisalError(f"the gradient graph of {source} is not valid at its opset {opset}: {gap}")
    converted, target = converted_model(model, sample_shape, batch, source, gap)
    grad = _gradient_model(converted, request, sample_shape, batch, source)
    left = opset_gap(grad)
    if left is not None:
        raise MultisalError(f"the gradient graph of {source} converted to opset {target} is not valid: {left}")
    notice = (f"{source} declares opset {opset}, which lacks what its gradient needs ({gap}): the gradient graph "
              f"is built on the model converted to opset {target} by onnx.version_converter (same outputs, checked)")
    grad.metadata_props.add(key=OPSET_CONVERSION, value=notice)
    LOG.warning("multisal: %s", notice)
    return grad


def opset_gap(grad_model) -> Optional[str]:
    """None where onnx's checker accepts every node of a gradient graph at its opset, else what it
    refused, in one line naming the model's node whose gradient needed it."""
    try:
        onnx.checker.check_model(grad_model)
    except onnx.checker.ValidationError as err:
        text = " ".join(str(err).split())
        node = re.search(r"Name: (\S+) OpType: (\w+)", text)
        reason = text.split(" ==> Context:")[0]
        if node and forward_node_name(node.group(1)) != node.group(1):
            return f"{reason} in the gradient of node {forward_node_name(node.group(1))!r}"
        return reason + (f" in node {node.group(1)!r}" if node else "")
    except ValueError:   # a model over protobuf's 2 GiB, which the checker cannot take whole
        return None
    return None


def converted_model(model, sample_shape, batch, source, why):
    """(model converted by onnx.version_converter to the first opset from RULES_OPSET on that it
    converts to and that gives the same outputs as the original on a random input, that opset)."""
    inp = graph_input(model)
    x = np.random.default_rng(0).standard_normal((batch, *sample_shape)).astype(
        helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
    original = runtime.run(runtime.session(model.SerializeToString(), source), {inp.name: x}, source)
    failures = []
    for target in CONVERSION_OPSETS:
        try:
            converted = version_converter.convert_version(model, target)
            onnx.checker.check_model(converted)
            values = runtime.run(runtime.session(converted.SerializeToString(), source), {inp.name: x}, source)
        except Exception as err:   # noqa: BLE001 - the converter, the checker and onnxruntime raise their own types
            failures.append(f"opset {target}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}")
            continue
        if all(np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max(initial=0)))
               for a, b in zip(original, values)):
            return converted, target
        failures.append(f"opset {target}: the converted model gives other outputs")
    raise MultisalError(f"{source}: {why}, and onnx.version_converter gives no model of a newer opset that "
                        f"computes the same ({'; '.join(failures)})")


def _gradient_model(model, request, sample_shape, batch, source):
    graph = model.graph
    opset = model_opset(model)
    inp = graph_input(model).name
    output = request.output or graph.output[0].name
    shapes, dtypes, shape_constants = probe(model, sample_shape, batch, source)
    for layer in request.layers:
        if layer not in shapes or layer == inp:
            close = closest_names(layer, [n for n in shapes if len(shapes[n]) == 4])
            raise MultisalError(f"unknown layer {layer!r}: no tensor of that name in the model"
                                + (f"; closest: {', '.join(close)}" if close else "; see `multisal layers MODEL`"))
    wrt = ([inp] if request.input_grad else []) + list(request.layers)
    constants = {**shape_constants, **constant_values(model)}
    constants.update(quantization.dequantised_constants(model, constants))
    quantised = quantization.quantised_tensors(model, constants)
    for layer in request.layers:
        if dtypes[layer] not in FLOAT_TYPES and layer not in quantised:
            raise MultisalError(f"layer {layer!r} is an integer tensor with no scale of its own (not a quantised "
                                "op's output): name a float layer or a quantised one")
    model = fold_pads_into_convs(model, GradContext(opset, shapes, dtypes, constants, set()), keep=request.layers)
    graph = model.graph

    depends, needed, active_nodes = gradient_path(graph, wrt, output, dtypes)
    for name in wrt:
        if name not in needed:
            raise MultisalError(f"the output {output!r} does not depend on {name!r}: nothing to differentiate")

    float_type = dtypes[output] if dtypes.get(output) in FLOAT_TYPES else FLOAT
    ctx = GradContext(opset, shapes, dtypes, constants, needed & depends, float_type=float_type)
    # The objective's forward nodes come first, differentiated like the model's from the seed
    # d objective / d f(output) = W (objective.py).
    first = len(ctx.nodes)
    ctx.scope = OBJECTIVE_SCOPE
    scores, weights, extra_inputs, extra_outputs = build_objective(ctx, output, request)
    objective_nodes = ctx.nodes[first:]
    for node in objective_nodes:
        if node.op_type not in SHAPE_ONLY_OPS and any(i in ctx.active for i in node.input):
            ctx.active.update(o for o in node.output if ctx.dtypes.get(o) in FLOAT_TYPES)
    grads = {scores: [weights]}
    totals = {}

    def total(name):
        if name not in totals:
            totals[name] = ctx.add_all(grads.get(name, []))
        return totals[name]

    for node in list(reversed(objective_nodes)) + active_nodes:
        ctx.scope = gradient_scope(node)
        ctx.meets(node)
        dys = [total(o) if o else None for o in node.output]
        if all(d is None for d in dys):
            continue
        rule = rule_for(node)
        if rule is None:
            raise MultisalError(f"no gradient rule for op {node.op_type} (node {node_label(node)!r}, "
                                f"opset {opset}{', domain ' + node.domain if node.domain else ''})")
        for i, dx in enumerate(rule(ctx, node, dys)):
            if dx is not None and ctx.needs(node, i):
                grads.setdefault(node.input[i], []).append(dx)

    wrt_totals, output_types = {}, {}
    for name in wrt:
        ctx.scope = grad_output_node(name)
        output_types[name] = dtypes[name]
        if name in quantised:   # a quantised layer: the gradient with respect to its real values, dq / s
            scale = quantised[name][0]
            output_types[name] = dtypes[scale]
            grad = total(name) or ctx.emit("Cast", [ctx.zeros_like(name)], to=output_types[name])
            wrt_totals[name] = ctx.emit("Div", [grad, scale])
        else:
            # A tensor that reaches the output only through ops of zero gradient (Floor, Sign, ...) gets none.
            wrt_totals[name] = total(name) or ctx.zeros_like(name)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    g = result.graph
    g.node.extend(ctx.nodes)
    g.initializer.extend(ctx.initializers)
    g.input.extend(extra_inputs)
    g.output.extend(extra_outputs)
    for name in wrt:
        g.node.append(helper.make_node("Identity", [wrt_totals[name]], [grad_name(name)], name=grad_output_node(name)))
        g.output.append(helper.make_tensor_value_info(grad_name(name), output_types[name], _batched(shapes[name])))
    for name in request.layers:
        shown = name
        if name in quantised:
            g.node.append(quantization.real_view(name, *quantised[name]))
            shown = quantization.REAL_PREFIX + name
        g.node.append(helper.make_node("Identity", [shown], [act_name(name)], name=f"multisal_act_out/{name}"))
        g.output.append(helper.make_tensor_value_info(act_name(name), output_types[name], _batched(shapes[name])))
    declare_as_probed(g, shapes)
    return result


def declare_as_probed(graph, shapes):
    """Every graph output and value_info whose declared shape the probe run contradicts (another
    rank, or another fixed extent) is declared with the probed rank and no extents instead:
    onnxruntime plans its buffers from declared shapes and fails at run time where a node reads
    such a tensor ("Shape mismatch attempting to re-use buffer"), as where an exporter declared
    (T, N, classes) logits as (1, T)."""
    for value in list(graph.output) + list(graph.value_info):
        probed, tensor = shapes.get(value.name), value.type.tensor_type
        if probed is None or not tensor.HasField("shape"):
            continue
        dims = tensor.shape.dim
        if len(dims) != len(probed) or any(d.HasField("dim_value") and d.dim_value != n for d, n in zip(dims, probed)):
            tensor.shape.ClearField("dim")
            for _ in probed:
                tensor.shape.dim.add()
