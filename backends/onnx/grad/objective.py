"""The objective, written into the gradient graph as forward nodes on the explained output.

The formulas are multisal.objectives' (the same for every backend): OnnxOps supplies its
operations as ONNX nodes for f(y) (softmax, log-softmax, ...), and the builder differentiates
those nodes with the same rules as the model's own. The sum of W * f(y) is linear in f(y), so its
gradient is W itself: the builder seeds d objective / d f(y) = W (for the logit, f(y) = y and the
seed is W on the output, with no node in between). The target weights W come from graph inputs:
the one-hot row of `multisal_target` (int64 per sample; -1 = the argmax of this pass) for a
classifier, or `multisal_region` (a weight per element of one sample's output) for a dense output.
For a detection target the graph takes the box, the IoU threshold and the class's one-hot as
inputs (one graph serves every box), and writes multisal.objectives' detection_terms as nodes: W
is then computed in the same pass from the output's box values, and only the class scores' nodes
are differentiated.
"""
from __future__ import annotations

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import
from multisal.objectives import Region, detection_terms, objective_scores

from .context import BOOL, INT64

helper = lazy_import("onnx.helper")

TARGET_INPUT = "multisal_target"
REGION_INPUT = "multisal_region"
USED_TARGET = "multisal_target_used"
BOX_INPUT = "multisal_box"
IOU_INPUT = "multisal_iou"
CLASS_INPUT = "multisal_class"


class OnnxOps:
    """The objective's operations (multisal.objectives) as nodes written through a GradContext;
    every tensor it makes gets its shape and type recorded, as the rules read them."""

    def __init__(self, ctx):
        self.ctx = ctx

    def _emit(self, op, inputs, shape, dtype=None, **attrs):
        name = self.ctx.emit(op, inputs, **attrs)
        self.ctx.shapes[name] = tuple(shape)
        self.ctx.dtypes[name] = self.ctx.float_type if dtype is None else dtype
        return name

    def shape(self, x):
        return self.ctx.shape(x)

    def _normalised(self, op, x, axis):
        # Before opset 13 (Log)Softmax normalises over every axis from `axis` on: for a class axis
        # that is not the last one, move it there and back.
        shape = self.shape(x)
        rank = len(shape)
        axis = axis % rank
        if self.ctx.opset >= 13 or axis == rank - 1:
            return self._emit(op, [x], shape, axis=axis)
        perm = [a for a in range(rank) if a != axis] + [axis]
        moved = self._emit("Transpose", [x], [shape[a] for a in perm], perm=perm)
        out = self._emit(op, [moved], [shape[a] for a in perm], axis=rank - 1)
        return self._emit("Transpose", [out], shape, perm=[int(i) for i in np.argsort(perm)])

    def softmax(self, x, axis):
        return self._normalised("Softmax", x, axis)

    def log_softmax(self, x, axis):
        return self._normalised("LogSoftmax", x, axis)

    def neg(self, x):
        return self._emit("Neg", [x], self.shape(x))

    def _broadcast(self, op, a, b, dtype=None):
        return self._emit(op, [a, b], np.broadcast_shapes(self.shape(a), self.shape(b)), dtype=dtype)

    def add(self, a, b):
        return self._broadcast("Add", a, b)

    def sub(self, a, b):
        return self._broadcast("Sub", a, b)

    def mul(self, a, b):
        return self._broadcast("Mul", a, b)

    def minimum(self, a, b):
        return self._broadcast("Min", a, b)

    def maximum(self, a, b):
        return self._broadcast("Max", a, b)

    def at_least(self, a, b):
        below = self._broadcast("Less", a, b, dtype=BOOL)
        return self._emit("Cast", [self._emit("Not", [below], self.shape(below), dtype=BOOL)], self.shape(below),
                          to=self.ctx.float_type)

    @staticmethod
    def stop_gradient(x):
        return x   # the builder differentiates only from f: nothing flows back into W

    def constant(self, array):
        name = self.ctx.const(array)
        self.ctx.shapes[name], self.ctx.dtypes[name] = tuple(np.shape(array)), self.ctx.float_type
        return name

    def take(self, x, axis, start, stop):
        shape = list(self.shape(x))
        shape[axis] = stop - start
        name = self.ctx.slice(x, [axis], [start], [stop])
        self.ctx.shapes[name], self.ctx.dtypes[name] = tuple(shape), self.ctx.dtypes.get(x, self.ctx.float_type)
        return name

    def one_hot(self, indices, n):
        classes = self.ctx.int64s(np.arange(n))
        unsqueezed = self.ctx.unsqueeze(indices, [1])
        hit = self._emit("Equal", [unsqueezed, classes], (self.shape(indices)[0], n), dtype=BOOL)
        return self._emit("Cast", [hit], (self.shape(indices)[0], n), to=self.ctx.float_type)


def build_objective(ctx, output, request):
    """Write the request's objective on `output`: returns (f's name, the weights W, which are
    d objective / d f, extra graph inputs, extra graph outputs)."""
    ops = OnnxOps(ctx)
    shape = ctx.shape(output)
    if request.detection is not None:
        axis, objectness = request.detection
        n_classes = shape[axis] - (5 if objectness else 4)
        inputs = []
        for name, input_shape in ((BOX_INPUT, (4,)), (IOU_INPUT, (1,)),
                                  (CLASS_INPUT, (n_classes, 1) if axis == 1 else (n_classes,))):
            ctx.shapes[name], ctx.dtypes[name] = input_shape, ctx.float_type
            inputs.append(helper.make_tensor_value_info(name, ctx.float_type, list(input_shape)))
        scores, weights = detection_terms(ops, output, request.objective, request.detection, BOX_INPUT, IOU_INPUT,
                                          CLASS_INPUT)
        return scores, weights, inputs, []
    if request.region:
        if len(shape) < 3:
            raise MultisalError(f"a region target needs a dense output (N,C,H,W), (N,T,C) or another layout with "
                                f"positions and channels; {output!r} has shape {shape}")
        weights = ops._emit("Expand", [REGION_INPUT, ctx.emit("Shape", [output])], shape)
        axis = Region.class_axis(shape, request.region_axis)
        inputs = [helper.make_tensor_value_info(REGION_INPUT, ctx.float_type, list(shape[1:]))]
        outputs = []
    else:
        if len(shape) != 2:
            raise MultisalError(f"output {output!r} has shape {shape}; a class target needs (N, classes), "
                                "use ms.region(channel, box=...) for dense outputs")
        argmax = ctx.emit("ArgMax", [output], axis=1, keepdims=0)
        used = ctx.emit("Where", [ctx.emit("Less", [TARGET_INPUT, ctx.int64s(0)]), argmax, TARGET_INPUT])
        ctx.nodes.append(helper.make_node("Identity", [used], [USED_TARGET], name="objective/used_target"))
        ctx.shapes[USED_TARGET], ctx.dtypes[USED_TARGET] = shape[:1], INT64
        weights = ops.one_hot(USED_TARGET, shape[1])
        axis = 1
        inputs = [helper.make_tensor_value_info(TARGET_INPUT, INT64, ["N"])]
        outputs = [helper.make_tensor_value_info(USED_TARGET, INT64, ["N"])]
    return objective_scores(ops, output, request.objective, axis), weights, inputs, outputs
