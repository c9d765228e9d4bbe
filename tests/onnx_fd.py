"""Finite-difference checks of ONNX gradient graphs, shared by the rule tests.

The oracle is onnx's reference evaluator on a float64 copy of the model (central differences,
step 1e-4 on a float64 input); the gradient graph under test is the float32 one, run in
onnxruntime. Agreement follows DESIGN.md's "Numerical agreement".
"""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from helpers import assert_agree, central_differences
from multisal.backends.onnx.grad.builder import GradientRequest, build_gradient_model
from multisal.backends.onnx.grad.builder import grad_name
from multisal.backends.onnx.grad.objective import TARGET_INPUT
from multisal.objectives import objective_from_scores

F32, F64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


def make_model(nodes, input_shape, output_shape, initializers=(), opset=17, input_name="x", output_name="y"):
    """A float32 model from nodes (onnx.helper.make_node) and initializers {name: array}, checked
    by onnx's checker; an output_shape of None leaves the output's shape unsaid, which the checker
    refuses, so that model is not checked."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(input_name, F32, list(input_shape))],
        [helper.make_tensor_value_info(output_name, F32, None if output_shape is None else list(output_shape))],
        [_initializer(v, k) for k, v in dict(initializers).items()])
    # onnxruntime's own ops (com.microsoft: the quantised ones its quantiser writes) are at version 1.
    domains = sorted({n.domain for n in nodes if n.domain not in ("", "ai.onnx")})
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, 1) for d in domains])
    model.ir_version = 8
    if output_shape is not None:
        onnx.checker.check_model(model)
    return model


def opsets_from(first, checked=(11, 13, 21)):
    """The opsets to check an op at: its first (11 at the earliest) and those of `checked` after it."""
    return sorted({max(first, checked[0]), *[o for o in checked if o >= first]})


def draw_uniform(rng, low, high, shape, kinks=(), ok=None, margin=0.02):
    """Uniform float32 values in [low, high], at least `margin` from every kink (finite differences
    mean nothing there), and accepted by ok."""
    while True:
        x = rng.uniform(low, high, shape).astype(np.float32)
        if all(np.abs(x - k).min() > margin for k in kinks) and (ok is None or ok(x)):
            return x


def draw_distinct(rng, shape, spacing=0.05):
    """Distinct values (a scaled permutation), so no max, ReLU or window sits on a tie or a kink."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * spacing).reshape(shape).astype(np.float32)


def classifier_head(feature_shape, rng, n_classes=3, source="h"):
    """Flatten + Gemm from `source` to a classifier output "y", so any feature map can be the
    objective's input: (nodes, initializers)."""
    size = int(np.prod(feature_shape[1:]))
    nodes = [helper.make_node("Flatten", [source], ["f"]),
             helper.make_node("Gemm", ["f", "Wfc", "bfc"], ["y"], transB=1)]
    return nodes, {"Wfc": rng.standard_normal((n_classes, size)) * 0.3, "bfc": rng.standard_normal(n_classes)}


def model_with_head(nodes, input_shape, feature_shape, rng, initializers=None, opset=17, n_classes=3):
    """nodes from "x" to the feature map "h", then classifier_head; the head's initializers come
    first in the model."""
    head, head_inits = classifier_head(feature_shape, rng, n_classes)
    return make_model(list(nodes) + head, input_shape, (input_shape[0], n_classes),
                      {**head_inits, **(initializers or {})}, opset=opset)


def ints(*values):
    return np.array(values, np.int64)


def check_body(body, input_shape, feature_shape, initializers=None, opset=17, target=(0, 2), *, rng, **kw):
    """check_input_gradient of body (from "x" to the feature map "h") + classifier_head, on a
    standard normal input."""
    model = model_with_head(body, input_shape, feature_shape, rng, initializers, opset=opset)
    x = rng.standard_normal(input_shape).astype(np.float32)
    return check_input_gradient(model, x, list(target)[:input_shape[0]], **kw)


def check_body_against_numpy(body, initializers, forward, input_shape, rng, opset, target=(0, 2)):
    """check_against_numpy of body + classifier_head, for bodies onnx's reference evaluator cannot
    run: forward(x) is a float64 numpy version of the body (x -> the feature map)."""
    x = rng.standard_normal(input_shape).astype(np.float32)
    head, head_inits = classifier_head(forward(x.astype(np.float64)).shape, rng)
    model = make_model(body + head, input_shape, (input_shape[0], 3), {**head_inits, **initializers}, opset=opset)

    def scores(v):
        return forward(v).reshape(len(v), -1) @ head_inits["Wfc"].T + head_inits["bfc"]

    check_against_numpy(model, x, np.asarray(target[:input_shape[0]]), scores)


def _initializer(value, name):
    """An initializer: integer arrays as they are, float ones as float32, TensorProtos (of the
    types numpy has none for: int4, float8) renamed."""
    if isinstance(value, onnx.TensorProto):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = name
        return tensor
    value = np.asarray(value)
    return numpy_helper.from_array(value if value.dtype.kind in "iub" else value.astype(np.float32), name)


def to_float64(model):
    """The same model in float64: inputs, outputs, initializers, Constant values and Casts to float."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type == F32:
            v.type.tensor_type.elem_type = F64
    for i, init in enumerate(m.graph.initializer):
        if init.data_type == F32:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for node in m.graph.node:
        for a in node.attribute:
            if a.name in ("value",) and a.t.data_type == F32:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if node.op_type == "Cast" and a.name == "to" and a.i == F32:
                a.i = F64
    return m


def run_gradient(model, x, target, objective="logit", layers=()):
    grad_model = build_gradient_model(model, GradientRequest(layers=tuple(layers), objective=objective), x.shape[1:],
                                      batch=x.shape[0])
    onnx.checker.check_model(grad_model)
    sess = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    inp = model.graph.input[0]
    x = x.astype(helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))   # float32, or float64 models'
    values = dict(zip(names, sess.run(None, {inp.name: x, TARGET_INPUT: np.asarray(target, np.int64)})))
    return values, grad_model


def finite_differences(model, x, target, objective="logit", step=1e-4):
    """d objective / d x by central differences in float64, one element at a time."""
    ref = ReferenceEvaluator(to_float64(model))
    name = model.graph.input[0].name
    x = x.astype(np.float64)

    def forward(v):
        scores = ref.run(None, {name: v})[0]
        return scores.reshape(len(v), -1) if scores.ndim != 2 else scores

    return objective_differences(forward, x, target, objective, step)


def objective_differences(forward, x, target, objective="logit", step=1e-4):
    """d objective / d x of any float64 forward function (inputs -> scores), by central
    differences one element at a time."""
    return central_differences(lambda v: objective_from_scores(forward(v), objective, np.asarray(target)).sum(),
                               x, step)


def check_against_numpy(model, x, target, scores):
    """The input gradient against central differences of `scores`, a float64 numpy version of the
    model (inputs -> logits), for models onnx's reference evaluator cannot run. `scores` is checked
    first to compute what onnxruntime computes."""
    name = model.graph.input[0].name
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_agree(session.run(None, {name: x})[0], scores(x.astype(np.float64)), tol=1e-5)
    values, _ = run_gradient(model, x, target)
    assert_agree(values[grad_name(name)], objective_differences(scores, x, target))


def check_input_gradient(model, x, target=None, objective="logit", tol=1e-3, reference=None):
    """Asserts that the gradient graph's input gradient agrees with finite differences of the
    model, or of `reference`, a float model whose derivative the gradient graph is meant to
    compute (a quantised model's float equivalent, for the straight-through estimator)."""
    if target is None:
        target = np.zeros(len(x), np.int64)
    values, _ = run_gradient(model, x, target, objective)
    got = values[grad_name(model.graph.input[0].name)]
    assert_agree(got, finite_differences(model if reference is None else reference, x, target, objective), tol=tol)
    return got
