"""The rule registry and the context a rule writes its gradient through.

A rule is `fn(ctx, node, dys) -> list` where `dys[k]` is the name of d objective / d node.output[k]
(None where nothing flows back through that output) and the result holds, per node input, the name
of its gradient or None. A rule computes only the inputs for which `ctx.needs(node, i)` is true:
parameters are never differentiated.

Most rules are of one of three kinds, as in JAX's ad.py, and are registered through them:
elementwise (defjvp/defjvp2: dx = dy * f'(x), f' written from the input or the output), linear
(deflinear: dx = A^T dy for y = A x) and zero (defjvp_zero: no gradient almost everywhere). The
others are written out with `rule`.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

helper = lazy_import("onnx.helper")
numpy_helper = lazy_import("onnx.numpy_helper")

# onnx.TensorProto's element types (numbers fixed by the ONNX standard).
FLOAT, INT32, INT64, BOOL, FLOAT16, DOUBLE, BFLOAT16 = 1, 6, 7, 9, 10, 11, 16
FLOAT_TYPES = {FLOAT, DOUBLE, FLOAT16, BFLOAT16}
INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)

RULES: Dict[str, Callable] = {}
# onnxruntime's contrib domain, and those of its ops (the quantised ones onnxruntime's quantiser
# writes) that have rules under the same op name (registered by rules/quantization.py).
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPS = set()
# The opsets the rules are written for: below, a rule may need an op the model's opset lacks, and
# the gradient graph is then built on the model converted to a newer one (builder.py).
RULES_OPSET = 11


class OpsetTooOld(MultisalError):
    """A rule needs an op, or a form of one, that the model's opset does not have."""


def rule(*op_types):
    def register(fn):
        for op in op_types:
            RULES[op] = fn
        return fn
    return register


def rule_for(node):
    """The gradient rule registered for a node's op (the default domain's ops, and the com.microsoft
    ops in CONTRIB_OPS), or None where there is none."""
    if node.domain in ("", "ai.onnx") or (node.domain == CONTRIB_DOMAIN and node.op_type in CONTRIB_OPS):
        return RULES.get(node.op_type)
    return None


def elementwise(*op_types, of, divide=False):
    """Registers the rule of an op applied elementwise to its first input x, from the decorated
    `derivative(ctx, node, v) -> name or None`: f' written from v, x itself (of="x") or the
    node's output y (of="y", which spares recomputing what the forward pass has), and the rule is
    dx = dy * f' (None: f' = 1, dx = dy). With divide, derivative writes 1 / f' and dx = dy / it
    (Log: dy / x in one Div). The other inputs (Clip's bounds) get no gradient."""
    def register(derivative):
        @functools.wraps(derivative)
        def differentiate(ctx, node, dys):
            d = derivative(ctx, node, node.output[0] if of == "y" else node.input[0])
            dx = dys[0] if d is None else ctx.emit("Div" if divide else "Mul", [dys[0], d])
            return [dx] + [None] * (len(node.input) - 1)
        rule(*op_types)(differentiate)
        return derivative
    return register


def linear(*op_types):
    """Registers the rule of an op linear in its first input, y = A x, the other inputs being
    parameters (shapes, indices, pads, weights), from the decorated `transpose(ctx, node, dy)`,
    which writes dx = A^T dy. A parameter that depends on the differentiated tensors is refused
    (A would then be a function of them too), and nothing is written where x needs no gradient."""
    def register(transpose):
        @functools.wraps(transpose)
        def differentiate(ctx, node, dys):
            ctx.only_data_input(node)
            dx = transpose(ctx, node, dys[0]) if ctx.needs(node, 0) else None
            return [dx] + [None] * (len(node.input) - 1)
        rule(*op_types)(differentiate)
        return transpose
    return register


def zero(*op_types):
    """Registers ops whose gradient is zero almost everywhere (piecewise constant: Sign, Floor, ...):
    nothing flows back through them, and a differentiated tensor that only reaches the output
    through them gets zeros (the builder writes them)."""
    def differentiate(ctx, node, dys):
        return [None] * len(node.input)
    # The rule belongs to the module that registers it (collections.namedtuple names its classes
    # the same way), as the other kinds' rules do through functools.wraps.
    differentiate.__module__ = sys._getframe(1).f_globals["__name__"]
    rule(*op_types)(differentiate)


def node_label(node):
    """How messages name a node: its name, else its first output (ONNX nodes need no name)."""
    return node.name or node.output[0]


# What GradContext writes is named <scope>/<OpType>_<k> (constants <scope>/const_<k>), k counting
# all it writes: the objective's nodes in OBJECTIVE_SCOPE, a rule's in gradient_scope(the node it
# differentiates), as onnxruntime's own gradient builder names them, so that an error onnxruntime
# raises in a gradient graph leads back to the model's node.
OBJECTIVE_SCOPE = "objective"
GRADIENT_SCOPE = "grad"


def gradient_scope(node):
    return f"{GRADIENT_SCOPE}/{node_label(node)}"


def forward_node_name(name):
    """The node whose gradient a gradient-graph node (or tensor) of that name was written for:
    grad/<node>/<OpType>_<k> -> <node>, the model's node as node_label names it, or an
    objective/... node, the objective's own. Any other name (the model's own nodes, the
    objective's, the builder's outputs) is not a rule's and comes back as it is."""
    prefix = GRADIENT_SCOPE + "/"
    if name.startswith(prefix):
        forward, sep, _ = name[len(prefix):].rpartition("/")
        if sep:
            return forward
    return name


def normalize_axis(axis, rank):
    return int(axis) + rank if int(axis) < 0 else int(axis)


class GradContext:
    def __init__(self, opset: int, shapes: dict, dtypes: dict, constants: dict, active: set,
                 float_type=FLOAT):
        self.opset = opset
        # The float type constants and masks are written in: the explained output's while the
        # objective is written, then that of the node being differentiated (meets), so that float16,
        # float64 and mixed-precision models (float16 inside, float32 at their Casts) get gradient
        # graphs that type-check.
        self.float_type = float_type
        self.shapes = shapes          # tensor name -> tuple of ints, as seen by a probe run
        self.dtypes = dtypes          # tensor name -> onnx TensorProto element type
        self.constants = constants    # tensor name -> numpy array (initializers, Constant outputs)
        self.active = active          # tensor names through which a gradient flows
        self.nodes = []
        self.initializers = []
        self.scope = GRADIENT_SCOPE   # the builder names the node whose gradient is being written
        self._count = 0
        self.deferred = {}            # tensor name -> what writes it, called when a node first reads it
        self.notes = {}               # what one rule tells another about a gradient it wrote

    @property
    def float_type(self):
        return self._float_type

    @float_type.setter
    def float_type(self, elem_type):
        self._float_type = elem_type
        self.float_dtype = helper.tensor_dtype_to_np_dtype(elem_type)

    def meets(self, node):
        """Write what follows in the float type of `node`'s tensors: its first float output's, else
        its first float input's. ONNX binds one type to an op's float inputs and outputs; Cast, the
        one op between two float types, casts its gradient back itself."""
        for name in list(node.output) + list(node.input):
            if self.dtypes.get(name) in FLOAT_TYPES:
                self.float_type = self.dtypes[name]
                return

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
        """A node's attribute, strings as str (ONNX keeps them as bytes); default where it has none."""
        for a in node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                if isinstance(value, bytes):
                    return value.decode()
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    return [v.decode() for v in value]
                return value
        return default

    def attributes(self, node, without=()):
        """A node's attributes as attr reads them, {name: value}, but those named in `without`: to
        write the same op again."""
        return {a.name: self.attr(node, a.name) for a in node.attribute if a.name not in without}

    # ---- what a rule may write ------------------------------------------------------------------
    def _name(self, kind):
        self._count += 1
        return f"{self.scope}/{kind}_{self._count}"

    def emit(self, op_type, inputs, outputs=1, domain="", **attrs):
        """Append a node; returns its output name (or names when outputs > 1): the node's own name,
        with :<i> after it when it has several."""
        self.ready(inputs)
        name = self._name(op_type)
        names = [name] if outputs == 1 else [f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def defer(self, name, write):
        """Makes `name` a tensor that `write()` puts into the graph (nodes or an initializer of
        that name) only when an emitted node first reads it: the dequantised operands of a
        quantised op, which its float rule may or may not read (onnxruntime runs nodes whose
        output nothing reads)."""
        self.deferred[name] = write

    def tensor_name(self, hint):
        """A fresh tensor name in the rule's scope, for a tensor the rule makes itself."""
        return self._name(hint)

    def ready(self, inputs):
        """Writes those of `inputs` that are deferred, before a node reads them."""
        for tensor in inputs:
            if tensor in self.deferred:
                self.deferred.pop(tensor)()

    def const(self, value, dtype=None, hint="const") -> str:
        name = self._name(hint)
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

    def mod(self, a, n):
        """a mod n of non-negative integers: Mod from opset 10, a - (a / n) n before it (integer
        Div truncates, which is the floor for non-negative values)."""
        if self.opset >= 10:
            return self.emit("Mod", [a, n])
        return self.emit("Sub", [a, self.emit("Mul", [self.emit("Div", [a, n]), n])])

    def positive(self, x):
        """[x > 0] as 0/1 in the model's float type: ReLU's mask."""
        return self.mask(self.emit("Greater", [x, self.const(0.0)]))

    def mask(self, condition):
        """A boolean tensor as 0/1 in the model's float type, applied with Mul (onnxruntime runs that
        faster than Where)."""
        return self.emit("Cast", [condition], to=self.float_type)

    def reshape_like(self, x, like):
        return self.emit("Reshape", [x, self.emit("Shape", [like])])

    def expand_like(self, x, like):
        """x broadcast to the shape of tensor `like` (its batch extent taken at run time)."""
        return self.emit("Expand", [x, self.emit("Shape", [like])])

    def unbroadcast(self, grad, out_name, in_name):
        """Sum a gradient shaped like a broadcasting op's output down to one input's shape."""
        out_shape, in_shape = self.shape(out_name), self.shape(in_name)
        lead = len(out_shape) - len(in_shape)
        if lead:
            grad = self.reduce("ReduceSum", grad, range(lead), keepdims=False)
        axes = [i for i, (o, n) in enumerate(zip(out_shape[lead:], in_shape)) if n == 1 and o != 1]
        return self.reduce("ReduceSum", grad, axes, keepdims=True)

    # ---- building blocks the rules share --------------------------------------------------------
    def np_dtype(self, name):
        """The numpy element type of a tensor (float32 where the probe did not see it)."""
        return helper.tensor_dtype_to_np_dtype(self.dtypes.get(name, FLOAT))

    def const_like(self, value, like):
        """A constant in the element type of tensor `like`."""
        return self.const(value, dtype=self.np_dtype(like))

    def zeros_like(self, name):
        """Zeros shaped like a forward tensor (its batch extent taken at run time)."""
        zero = numpy_helper.from_array(np.zeros(1, dtype=self.np_dtype(name)))
        return self.emit("ConstantOfShape", [self.emit("Shape", [name])], value=zero)

    def reshape(self, x, target):
        return self.emit("Reshape", [x, self.int64s(target)])

    def slice(self, x, axes, starts, ends, steps=None):
        """x[starts:ends:steps] along axes, as a Slice of the model's opset (inputs from opset 10)."""
        steps = list(steps) if steps is not None else [1] * len(axes)
        if self.opset >= 10:
            inputs = [x, self.int64s(starts), self.int64s(ends), self.int64s(axes)]
            if any(s != 1 for s in steps):
                inputs.append(self.int64s(steps))
            return self.emit("Slice", inputs)
        if any(s != 1 for s in steps):
            raise OpsetTooOld(f"opset {self.opset}: Slice has no steps before opset 10")
        return self.emit("Slice", [x], starts=[int(s) for s in starts], ends=[int(e) for e in ends],
                         axes=[int(a) for a in axes])

    def reverse(self, x, axis):
        # x[::-1] along axis: start at the last element, end clamped to before the first.
        return self.slice(x, [axis], [-1], [INT64_MIN], [-1])

    def pad(self, x, rank, pads_by_axis):
        """Zero padding, {axis: (before, after)}, in the model's opset form (pads an input from 11)."""
        pads = [0] * (2 * rank)
        for axis, (before, after) in pads_by_axis.items():
            pads[axis], pads[axis + rank] = int(before), int(after)
        if not any(pads):
            return x
        if self.opset >= 11:
            return self.emit("Pad", [x, self.int64s(pads)])
        return self.emit("Pad", [x], pads=pads)

    def contract_axis(self, g, axis, rank, matrix, dtype=np.float32):
        """g contracted with a matrix along one axis: out[..., j, ...] = sum_i g[..., i, ...] M[i, j].

        matrix is a numpy array (a constant of the graph) or the name of a 2-D tensor."""
        const = not isinstance(matrix, str)
        if axis == rank - 1:
            return self.emit("MatMul", [g, self.const(matrix, dtype=dtype) if const else matrix])
        if axis == rank - 2:  # M^T @ g broadcasts over the leading axes
            mt = self.const(np.ascontiguousarray(matrix.T), dtype=dtype) if const else \
                self.emit("Transpose", [matrix], perm=[1, 0])
            return self.emit("MatMul", [mt, g])
        perm = [i for i in range(rank) if i != axis] + [axis]
        moved = self.emit("Transpose", [g], perm=perm)
        out = self.emit("MatMul", [moved, self.const(matrix, dtype=dtype) if const else matrix])
        return self.emit("Transpose", [out], perm=[int(i) for i in np.argsort(perm)])

    def inverse_count(self, x, reduced, axes):
        """1 / the number of elements of x reduced over axes into `reduced`: a constant, or computed
        from the sizes when the batch axis is among them (the batch is free at run time)."""
        if 0 not in axes:
            shape = self.shape(x)
            return self.const(1.0 / int(np.prod([shape[a] for a in axes])))
        sizes = [self.emit("Cast", [self.emit("Size", [t])], to=self.float_type) for t in (reduced, x)]
        return self.emit("Div", sizes)

    def sliding_window(self, node, kernel):
        """strides, dilations, begin pads and end pads of a Conv or pool node over its spatial axes.

        SAME_UPPER puts the odd pad at the end, SAME_LOWER at the beginning, as onnxruntime does;
        the output size is the probed one (it already says what ceil_mode did)."""
        in_sp, out_sp = self.shape(node.input[0])[2:], self.shape(node.output[0])[2:]
        spatial = len(in_sp)
        strides = [int(s) for s in self.attr(node, "strides", [1] * spatial)]
        dilations = [int(d) for d in self.attr(node, "dilations", [1] * spatial)]
        auto_pad = self.attr(node, "auto_pad", "NOTSET")
        pads = self.attr(node, "pads")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for k, s, d, n, o in zip(kernel, strides, dilations, in_sp, out_sp):
                total = max((o - 1) * s + (k - 1) * d + 1 - n, 0)
                small = total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else total - small)
                end.append(total - begin[-1])
        elif auto_pad == "VALID" or pads is None:
            begin, end = [0] * spatial, [0] * spatial
        else:
            begin, end = [int(p) for p in pads[:spatial]], [int(p) for p in pads[spatial:]]
        return strides, dilations, begin, end

    def only_data_input(self, node):
        """Refuses a node whose other inputs (weights, statistics) depend on the differentiated
        tensors: its rule differentiates only the data input."""
        for i in range(1, len(node.input)):
            if self.needs(node, i):
                raise MultisalError(f"{node.op_type} node {node_label(node)!r}: input {i} ({node.input[i]!r}) "
                                    "depends on the differentiated tensors; only the gradient through its first "
                                    "input is supported")

    def add_all(self, names):
        names = [n for n in names if n is not None]
        if not names:
            return None
        return names[0] if len(names) == 1 else self.emit("Sum", names)
