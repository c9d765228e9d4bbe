"""The batch rewrite: a model exported with a fixed batch of 1 made to take any batch.

Exporters with fixed shapes write the batch of 1 into constants: Reshape targets ((1, 196, 192),
Swin's window partitions (1*64, 49, 96) and their reverse), class and distillation tokens expanded
to the batch and concatenated to the patch tokens, LSTM initial states (2, 1*H, C), slice ends,
Resize sizes. The rewrite follows the batch through the graph: for
each tensor, the axis that holds it (its size there is the batch times a multiplicity, the number
of windows or rows per image, the batch being the outermost factor as torch's views make it), from
the input's axis 0 through each op (ops that keep the shape, broadcasting, Reshape by the row-major
position of the axis, Transpose, (Un)Squeeze, Gather, reductions, MatMul, LSTM/GRU, ...). Where a
constant says 1 for that axis it is rewritten: a Reshape target becomes the probed shape with -1
on the batch axis, an Expand target 1 there, a Slice over the whole axis ends at its end, a
Resize's sizes take the axis from the data at run time; and a constant operand that must match
the batch (a token concatenated to the batched ones, an initial state, an operand not
broadcastable) is tiled by the batch, taken from the input's shape at run time.

Whatever the rewrite cannot follow, it leaves as it was: the rewrite is only a proposal, kept by
model.prepare_model only where a run on a batch of 2 gives the shapes and values of the original
run one image at a time.
"""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from .grad.builder import RANDOM_OPS, constant_values, graph_input, probe
from .grad.context import INT64_MAX

onnx = lazy_import("onnx")
helper = lazy_import("onnx.helper")
numpy_helper = lazy_import("onnx.numpy_helper")

BATCH_PARAM = "N"
PREFIX = "multisal_batch"

# Ops whose inputs broadcast against each other (numpy's rules, right-aligned).
BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less",
                 "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift"}
REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin"}


class _Rewrite:
    def __init__(self, model):
        self.model = model
        inp = graph_input(model)
        self.input = inp.name
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        self.shapes, _, probed = probe(model, dims[1:], 1)
        self.values = {**probed, **constant_values(model)}
        # Tensors whose values are the same at any batch ("free"): initializers, Constants and what is
        # computed from them and from the input's shape without its batch entry (the image size is
        # fixed). Integer tensors computed from the batch entry get a mask of their entries that
        # hold it (`dependent`): a Gather of the shape at another index is free again.
        self.free = {init.name for init in model.graph.initializer}
        self.dependent = {}
        self.axis = {inp.name: 0}          # tensor -> the axis holding the batch
        self.nodes, self.initializers = [], []
        self._count = 0
        self._batch = None

    # ---- writing ----------------------------------------------------------------------------------
    def name(self, kind):
        self._count += 1
        return f"{PREFIX}/{kind}_{self._count}"

    def emit(self, op, inputs, **attrs):
        out = self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value):
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    def batch(self):
        """(1,) int64: the batch size at run time, from the input's shape."""
        if self._batch is None:
            shape = self.emit("Shape", [self.input])
            self._batch = self.emit("Slice", [shape, self.const([0]), self.const([1]), self.const([0])])
        return self._batch

    def tiled(self, name, axis):
        """A free tensor repeated batch times along axis (its value for each image, in order)."""
        rank = len(self.shapes[name])
        repeats = self.emit("Concat", [self.const([1] * axis), self.batch(), self.const([1] * (rank - axis - 1))], axis=0) \
            if rank > 1 else self.batch()
        return self.emit("Tile", [name, repeats])

    # ---- reading ----------------------------------------------------------------------------------
    def shape(self, name):
        return self.shapes.get(name)

    def ints(self, node, index, attribute):
        """An int list given as input `index` (a constant) or as attribute; None where neither."""
        if len(node.input) > index and node.input[index]:
            value = self.values.get(node.input[index])
            return None if value is None else [int(v) for v in np.ravel(value)]
        for a in node.attribute:
            if a.name == attribute:
                return [int(v) for v in helper.get_attribute_value(a)]
        return None

    def attr(self, node, attribute, default=None):
        for a in node.attribute:
            if a.name == attribute:
                return helper.get_attribute_value(a)
        return default


def _row_major_axis(in_shape, axis, out_shape):
    """The output axis of a reshape that holds the input's `axis`, the batch being the outermost
    factor of that axis: the first whose preceding sizes multiply to those before `axis`."""
    before = int(np.prod(in_shape[:axis]))
    for j in range(len(out_shape)):
        if int(np.prod(out_shape[:j])) == before:
            return j
    return None


def _track_freedom(rw, node):
    """Marks node's outputs free, or batch-dependent in some entries (shape arithmetic), or neither
    (computed from the images)."""
    op = node.op_type
    if op in RANDOM_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return
    outs = [o for o in node.output if o]
    if op == "Shape":
        x = node.input[0]
        if x in rw.free:
            rw.free.update(outs)
        elif rw.axis.get(x) is not None and rw.shape(x) is not None:
            positions = list(range(len(rw.shape(x))))[slice(rw.attr(node, "start", 0), rw.attr(node, "end", None))]
            mask = np.array([p == rw.axis[x] for p in positions])
            if mask.any():
                rw.dependent[outs[0]] = mask
            else:
                rw.free.update(outs)
        return
    inputs = [i for i in node.input if i]
    if all(i in rw.free for i in inputs):
        rw.free.update(outs)
        return
    if any(i not in rw.free and i not in rw.dependent for i in inputs) or len(outs) != 1 \
            or rw.shape(outs[0]) is None:
        return

    def mask(name):
        return rw.dependent[name] if name in rw.dependent else np.zeros(rw.shape(name), bool)

    out_shape = rw.shape(outs[0])
    try:
        if op == "Gather" and node.input[1] in rw.free and node.input[1] in rw.values:
            result = np.take(mask(node.input[0]), rw.values[node.input[1]], axis=int(rw.attr(node, "axis", 0)))
        elif op == "Slice" and rw.shape(node.input[0]) is not None and len(rw.shape(node.input[0])) == 1:
            starts, ends = rw.ints(node, 1, "starts"), rw.ints(node, 2, "ends")
            steps = rw.ints(node, 4, "steps") or [1]
            result = mask(node.input[0])[slice(starts[0], ends[0], steps[0])]
        elif op == "Concat":
            result = np.concatenate([mask(i).reshape(rw.shape(i)) for i in inputs], axis=int(rw.attr(node, "axis", 0)))
        elif op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten", "Cast", "Identity", "Neg", "Abs", "Floor", "Ceil"):
            result = mask(node.input[0]).reshape(out_shape)
        elif op in BROADCAST_OPS:
            result = np.logical_or.reduce([np.broadcast_to(mask(i), out_shape) for i in inputs])
        else:
            result = np.ones(out_shape, bool)
    except (TypeError, ValueError, IndexError):   # a form the masks do not follow: batch-dependent
        result = np.ones(out_shape, bool)
    if np.shape(result) == tuple(out_shape) and not np.any(result):
        rw.free.update(outs)
    else:
        rw.dependent[outs[0]] = np.ones(out_shape, bool) if np.shape(result) != tuple(out_shape) else result


def _visit(rw, node):
    """Rewrites what in `node` says 1 for the batch and records its outputs' batch axes."""
    op = node.op_type
    shapes = [rw.shape(i) if i else None for i in node.input]
    axes = [rw.axis.get(i) if i else None for i in node.input]
    outs = [o for o in node.output if o]
    out_shapes = [rw.shape(o) for o in outs]
    if any(s is None for s in out_shapes):
        return
    if op in ("Expand", "ConstantOfShape") and axes[0] is None:
        # A free tensor brought to a shape computed with the batch (an LSTM's zero initial state
        # expanded to (2, rows, C)): the batch axis is the dependent entry, and a free operand
        # whose size there is the batch-1 multiplicity k > 1 is tiled first (Expand cannot make k into N k).
        shape_input = node.input[1] if op == "Expand" else node.input[0]
        mask = rw.dependent.get(shape_input)
        if mask is not None and mask.ndim == 1 and mask.sum() == 1:
            p = int(np.argmax(mask))
            if op == "Expand" and node.input[0] in rw.free:
                q = p - (len(mask) - len(shapes[0]))
                if q >= 0 and shapes[0][q] > 1:
                    node.input[0] = rw.tiled(node.input[0], q)
            rw.axis[node.output[0]] = p
        return
    if op == "Reshape" and axes[0] is None and node.input[0] not in rw.free and node.input[1] in rw.free \
            and out_shapes[0][:1] == (1,):
        # The batch lost on the way (an op the rewrite does not follow), a target of batch 1: as
        # exporters write a flatten before the classifier, the batch is taken to be its first axis.
        node.input[1] = rw.const([-1] + list(out_shapes[0][1:]))
        rw.axis[node.output[0]] = 0
        return
    if all(a is None for a in axes):
        return
    b = axes[0]
    out_rank = len(out_shapes[0])

    def settle(axis, names=outs):
        for o in names:
            rw.axis[o] = axis

    if op in BROADCAST_OPS:
        aligned = {a + out_rank - len(s) for a, s in zip(axes, shapes) if a is not None}
        if len(aligned) != 1:
            return
        (a,) = aligned
        for i, (name, s) in enumerate(zip(node.input, shapes)):
            if name and axes[i] is None and name in rw.free:
                p = a - (out_rank - len(s))
                if p >= 0 and s[p] != 1:
                    node.input[i] = rw.tiled(name, p)
        settle(a)
    elif op == "Concat":
        batched = {a for a in axes if a is not None}
        if len(batched) != 1:
            return
        (a,) = batched
        concat_axis = int(rw.attr(node, "axis")) % out_rank
        if concat_axis != a:
            for i, name in enumerate(node.input):
                if axes[i] is None and name in rw.free:
                    node.input[i] = rw.tiled(name, a)
        settle(a)
    elif op == "Reshape" and b is not None:
        j = _row_major_axis(shapes[0], b, out_shapes[0])
        if j is None:
            return
        if node.input[1] in rw.free:
            target = list(out_shapes[0])
            target[j] = -1
            node.input[1] = rw.const(target)
        settle(j)
    elif op == "Flatten" and b is not None:
        split = int(rw.attr(node, "axis", 1)) % max(len(shapes[0]), 1)
        if b < split and int(np.prod(shapes[0][:b])) == 1:
            settle(0)
        elif b >= split and int(np.prod(shapes[0][split:b])) == 1:
            settle(1)
    elif op == "Transpose" and b is not None:
        perm = rw.attr(node, "perm") or list(range(len(shapes[0])))[::-1]
        settle(list(perm).index(b))
    elif op == "Unsqueeze" and b is not None:
        inserted = {a % out_rank for a in (rw.ints(node, 1, "axes") or [])}
        settle([p for p in range(out_rank) if p not in inserted][b])
    elif op == "Squeeze" and b is not None:
        rank = len(shapes[0])
        removed = rw.ints(node, 1, "axes")
        if removed is None:   # every size-1 axis: the batch's too, at batch 1
            return
        removed = {a % rank for a in removed}
        if b in removed:
            return
        settle(b - sum(1 for a in removed if a < b))
    elif op == "Gather":
        axis = int(rw.attr(node, "axis", 0)) % len(shapes[0])
        if b is not None and axis != b:
            settle(b if b < axis else b - 1 + len(shapes[1]))
        elif b is not None and node.input[1] in rw.free and node.input[1] in rw.values and len(shapes[1]) > 0:
            # Indices into the batch axis fixed for one image (the dynamo exporter's as_strided reads
            # a flattened tensor through a constant index array): image n reads the same positions
            # offset by n k (k = the axis' size per image), stacked along the indices' first axis.
            k = shapes[0][b]
            index = np.asarray(rw.values[node.input[1]]).astype(np.int64)
            index = np.where(index < 0, index + k, index)
            if index.size and (index.min() < 0 or index.max() >= k):
                return
            scalar = rw.emit("Reshape", [rw.batch(), rw.const(np.zeros(0, np.int64))])
            images = rw.emit("Range", [rw.const(0), scalar, rw.const(1)])
            offsets = rw.emit("Reshape", [rw.emit("Mul", [images, rw.const(k)]), rw.const([-1] + [1] * index.ndim)])
            stacked = rw.emit("Add", [offsets, rw.const(index[None])])                        # (N, *index)
            node.input[1] = rw.emit("Reshape", [stacked, rw.const([-1] + list(index.shape[1:]))])
            settle(axis)
        elif b is None and axes[1] is not None:
            settle(axis + axes[1])
    elif op == "GatherND" and b is not None and not int(rw.attr(node, "batch_dims", 0)):
        indexed = shapes[1][-1]
        if b >= indexed:
            settle(len(shapes[1]) - 1 + b - indexed)
    elif op == "Slice" and b is not None:
        sliced = rw.ints(node, 3, "axes")
        starts, ends = rw.ints(node, 1, "starts"), rw.ints(node, 2, "ends")
        if sliced is None and starts is not None:
            sliced = list(range(len(starts)))
        if sliced is not None and starts is not None and ends is not None:
            sliced = [a % len(shapes[0]) for a in sliced]
            if b in sliced:
                k = sliced.index(b)
                steps = rw.ints(node, 4, "steps") or [1] * len(sliced)
                if starts[k] == 0 and steps[k] == 1 and ends[k] >= shapes[0][b] and len(node.input) > 2:
                    ends[k] = INT64_MAX                # the whole axis at batch 1: the whole axis at any batch
                    node.input[2] = rw.const(ends)
                elif not (starts[k] == 0 and steps[k] == 1 and ends[k] >= shapes[0][b]):
                    return
        settle(b)
    elif op == "Split" and b is not None:
        if int(rw.attr(node, "axis", 0)) % len(shapes[0]) != b:
            settle(b)
    elif op == "MatMul":
        ra, rb = len(shapes[0]), len(shapes[1])
        aligned = set()
        if axes[0] is not None and ra > 1 and axes[0] != ra - 1:
            aligned.add(axes[0] + out_rank - ra)
        if axes[1] is not None and rb > 1 and axes[1] != rb - 2:
            aligned.add(out_rank - 1 if axes[1] == rb - 1 else axes[1] + out_rank - rb)
        if len(aligned) == 1 and (axes[0] is None or axes[1] is None or ra == rb):
            settle(aligned.pop())
    elif op == "Gemm" and b == 0 and not int(rw.attr(node, "transA", 0)):
        settle(0)
    elif op in REDUCE_OPS and b is not None:
        rank = len(shapes[0])
        if op in ("ArgMax", "ArgMin"):
            reduced = [int(rw.attr(node, "axis", 0))]
        else:
            reduced = rw.ints(node, 1, "axes")
            if not reduced:
                return
        reduced = {a % rank for a in reduced}
        if b not in reduced:
            settle(b if int(rw.attr(node, "keepdims", 1)) else b - sum(1 for a in reduced if a < b))
    elif op in ("LSTM", "GRU") and b == 1:
        for i in (4, 5, 6):   # sequence lengths (B,), initial states (D, B, H)
            if len(node.input) > i and node.input[i] and node.input[i] in rw.free:
                node.input[i] = rw.tiled(node.input[i], 0 if i == 4 else 1)
        rw.axis[node.output[0]] = 2 if node.output[0] else None
        settle(1, [o for o in node.output[1:] if o])
    elif op == "Expand" and b is not None:
        a = b + out_rank - len(shapes[0])
        if node.input[1] in rw.free:
            target = [int(v) for v in np.ravel(rw.values[node.input[1]])]
            target[a - (out_rank - len(target))] = 1
            node.input[1] = rw.const(target)
        settle(a)
    elif op == "Resize" and b is not None:
        if len(node.input) > 3 and node.input[3] in rw.free:
            sizes = [int(v) for v in np.ravel(rw.values[node.input[3]])]
            if len(sizes) == len(shapes[0]):
                extent = rw.emit("Slice", [rw.emit("Shape", [node.input[0]]), rw.const([b]), rw.const([b + 1]),
                                           rw.const([0])])
                node.input[3] = rw.emit("Concat", [rw.const(sizes[:b]), extent, rw.const(sizes[b + 1:])], axis=0)
        settle(b)
    elif op in ("Shape", "Size"):
        return
    elif b is not None and all(len(s) == len(shapes[0]) and s[b] == shapes[0][b] for s in out_shapes):
        settle(b)   # ops that keep the batch where it is: convolutions, pools, norms, activations, ...


def free_batch(model):
    """A copy of `model` (fixed batch of 1) whose batch axis is symbolic, with the constants that
    say 1 for the batch rewritten (see the module's docstring); None where the model has no
    fixed batch of 1 or cannot run to be probed."""
    dims = graph_input(model).type.tensor_type.shape.dim
    if not dims or dims[0].dim_value != 1:
        return None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        rw = _Rewrite(m)
    except (MultisalError, onnx.shape_inference.InferenceError):   # a model that cannot be probed keeps its batch
        return None
    nodes = []
    for node in m.graph.node:
        rw.nodes = []
        try:
            _visit(rw, node)
            _track_freedom(rw, node)
        except (KeyError, IndexError, ValueError, TypeError):   # a node of a form the rewrite does not read:
            return None                                         # no proposal, the model keeps its batch of 1
        nodes += rw.nodes + [node]   # what the rewrite adds for a node (first the batch size) comes before it
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(rw.initializers)
    for v in list(m.graph.input[:1]) + list(m.graph.output):
        out_dims = v.type.tensor_type.shape.dim
        if out_dims:
            out_dims[0].ClearField("dim_value")
            out_dims[0].dim_param = BATCH_PARAM
    del m.graph.value_info[:]
    return m
