"""The rule registry and the context a rule writes its gradient through.

A rule is `fn(ctx, node, dys) -> list` where `dys[k]` is the name of d objective / d node.output[k]
(None where nothing flows back through that output) and the result holds, per node input, the name
of its gradient or None. A rule computes only the inputs for which `ctx.needs(node, i)` is true:
parameters are never differentiated.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

onnx = lazy_import("onnx")
helper = lazy_import("onnx.helper")
numpy_helper = lazy_import("onnx.numpy_helper")

# onnx.TensorProto's element types (numbers fixed by the ONNX standard).
FLOAT, INT32, INT64, BOOL, FLOAT16, DOUBLE, BFLOAT16 = 1, 6, 7, 9, 10, 11, 16
FLOAT_TYPES = {FLOAT, DOUBLE, FLOAT16, BFLOAT16}

RULES: Dict[str, Callable] = {}


def rule(*op_types):
    def register(fn):
        for op in op_types:
            RULES[op] = fn
        return fn
    return register


class GradContext:
    def __init__(self, opset: int, shapes: dict, dtypes: dict, constants: dict, active: set,
                 float_type=FLOAT):
        self.opset = opset
        # The model's float type: constants and masks are written in it, so float16 and float64
        # models get gradient graphs that type-check.
        self.float_type = float_type
        self.float_dtype = helper.tensor_dtype_to_np_dtype(float_type)
        self.shapes = shapes          # tensor name -> tuple of ints, as seen by a probe run
        self.dtypes = dtypes          # tensor name -> onnx TensorProto element type
        self.constants = constants    # tensor name -> numpy array (initializers, Constant outputs)
        self.active = active          # tensor names through which a gradient flows
        self.nodes = []
        self.initializers = []
        self._count = 0

    # ---- what a rule may ask --------------------------------------------------------------------
    def needs(self, node, i: int) -> bool:
        """Whether input i of node needs a gradient (it depends on what is differentiated)."""
        return i < len(node.input) and node.input[i] in self.active

    def shape(self, name):
        if name not in self.shapes:
            raise MultisalError(f"no shape known for tensor {name!r}")
        return self.shapes[name]

    def rank(self, name) -> int:
        return len(self.shape(name))

    def const_value(self, name):
        """The value of a tensor fixed at build time (initializer or Constant), else None."""
        return self.constants.get(name)

    @staticmethod
    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    # ---- what a rule may write ------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"grad/{hint}/{self._count}"

    def emit(self, op_type, inputs, outputs=1, domain="", **attrs):
        """Append a node; returns its output name (or names when outputs > 1)."""
        names = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type + "_node"),
                                           domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=None, hint="const") -> str:
        name = self.fresh(hint)
        value = np.asarray(value, dtype=self.float_dtype if dtype is None else dtype)
        self.initializers.append(numpy_helper.from_array(value, name))
        self.constants[name] = value
        return name

    def int64s(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), dtype=np.int64, hint="ints")

    # ---- opset-aware building blocks ------------------------------------------------------------
    def reduce(self, op, x, axes, keepdims=True):
        """ReduceSum/ReduceMean/ReduceMax over axes, in the form the model's opset expects."""
        axes = [int(a) for a in axes]
        if not axes:
            return x
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            return self.emit(op, [x, self.int64s(axes)], keepdims=int(keepdims))
        return self.emit(op, [x], axes=axes, keepdims=int(keepdims))

    def unsqueeze(self, x, axes):
        if self.opset >= 13:
            return self.emit("Unsqueeze", [x, self.int64s(axes)])
        return self.emit("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x, axes):
        if self.opset >= 13:
            return self.emit("Squeeze", [x, self.int64s(axes)])
        return self.emit("Squeeze", [x], axes=list(axes))

    def mask(self, condition):
        """A boolean tensor as 0/1 in the model's float type, applied with Mul (onnxruntime runs that
        faster than Where)."""
        return self.emit("Cast", [condition], to=self.float_type)

    def reshape_like(self, x, like):
        return self.emit("Reshape", [x, self.emit("Shape", [like])])

    def unbroadcast(self, grad, out_name, in_name):
        """Sum a gradient shaped like a broadcasting op's output down to one input's shape."""
        out_shape, in_shape = self.shape(out_name), self.shape(in_name)
        lead = len(out_shape) - len(in_shape)
        if lead:
            grad = self.reduce("ReduceSum", grad, range(lead), keepdims=False)
        axes = [i for i, (o, n) in enumerate(zip(out_shape[lead:], in_shape)) if n == 1 and o != 1]
        return self.reduce("ReduceSum", grad, axes, keepdims=True)

    def add_all(self, names):
        names = [n for n in names if n is not None]
        if not names:
            return None
        return names[0] if len(names) == 1 else self.emit("Sum", names)
