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
    """A float32 model from nodes (onnx.helper.make_node) and initializers {name: array}."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(input_name, F32, list(input_shape))],
        [helper.make_tensor_value_info(output_name, F32, list(output_shape))],
        [numpy_helper.from_array(_as_initializer(v), k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _as_initializer(value):
    value = np.asarray(value)
    return value if value.dtype.kind in "iub" else value.astype(np.float32)


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
    values = dict(zip(names, sess.run(None, {model.graph.input[0].name: x.astype(np.float32),
                                              TARGET_INPUT: np.asarray(target, np.int64)})))
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


def check_input_gradient(model, x, target=None, objective="logit", tol=1e-3):
    """Asserts that the gradient graph's input gradient agrees with finite differences."""
    if target is None:
        target = np.zeros(len(x), np.int64)
    values, _ = run_gradient(model, x, target, objective)
    got = values[grad_name(model.graph.input[0].name)]
    assert_agree(got, finite_differences(model, x, target, objective), tol=tol)
    return got
