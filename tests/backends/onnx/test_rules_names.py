"""A gradient graph's node names lead back to the model's nodes: grad/<forward node>/<OpType>_<k>
for what a rule writes, objective/... for the objective, and forward_node_name reads the model's
node back, also out of an onnxruntime error."""
import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from multisal.backends.onnx import runtime
from multisal.backends.onnx.grad.context import forward_node_name
from multisal.errors import MultisalError
from multisal.backends.onnx.grad.objective import TARGET_INPUT
from onnx_fd import model_with_head, run_gradient

RNG = np.random.default_rng(4)
X_SHAPE = (2, 2, 4, 4)
# A torch-style name with slashes, a node without a name (known by its output), a plain name.
NODES = [helper.make_node("Conv", ["x", "W"], ["c"], name="/features/0/Conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["relu_out"]),
         helper.make_node("MaxPool", ["relu_out"], ["h"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]


def _gradient_graph():
    model = model_with_head(NODES, X_SHAPE, (2, 3, 2, 2), RNG, {"W": RNG.standard_normal((3, 2, 3, 3))})
    x = RNG.standard_normal(X_SHAPE).astype(np.float32)
    _, grad_model = run_gradient(model, x, [0, 1], objective="softmax")
    return model, grad_model, x


def test_every_written_node_names_the_node_it_differentiates():
    model, grad_model, _ = _gradient_graph()
    labels = {n.name or n.output[0] for n in model.graph.node}
    written = list(grad_model.graph.node)[len(model.graph.node):]
    objective = {n.name for n in written if n.name.startswith("objective/")}
    differentiated = set()
    for node in written:
        match = re.fullmatch(r"grad/(.+)/([A-Za-z0-9]+)_\d+", node.name)
        if match:
            assert match.group(2) == node.op_type
            assert forward_node_name(node.name) == match.group(1) in labels | objective
            differentiated.add(match.group(1))
        else:
            assert node.name.startswith(("objective/", "multisal_grad_out/")), node.name
    assert {"/features/0/Conv", "relu_out", "pool", "y", "f"} <= differentiated
    assert any(name.startswith("objective/Softmax") for name in differentiated)
    assert len({n.name for n in written}) == len(written)
    for name in ["/features/0/Conv", "objective/Softmax_10", "multisal_grad_out/x"]:
        assert forward_node_name(name) == name


def test_an_onnxruntime_error_in_the_gradient_graph_leads_to_the_model_node():
    _, grad_model, x = _gradient_graph()
    # Break what the MaxPool's gradient writes: a Reshape to a shape its input cannot take.
    reshape = next(n for n in grad_model.graph.node if n.op_type == "Reshape" and n.name.startswith("grad/pool/")
                   and n.input[1].startswith("grad/pool/ints_"))
    index = next(i for i, t in enumerate(grad_model.graph.initializer) if t.name == reshape.input[1])
    broken = numpy_helper.from_array(np.array([7, -1, 5], np.int64), reshape.input[1])
    grad_model.graph.initializer[index].CopyFrom(broken)
    with pytest.raises(Exception) as error:
        session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"x": x, TARGET_INPUT: np.array([0, 1])})
    named = re.findall(r"grad/[\w/.-]+_\d+", str(error.value))
    assert reshape.name in named and {forward_node_name(name) for name in named} == {"pool"}


def test_an_onnxruntime_failure_in_the_gradient_graph_is_one_line_naming_the_model_node():
    """multisal.backends.onnx.runtime turns the same failure into one line: the model's node, not
    onnxruntime's source locations."""
    _, grad_model, x = _gradient_graph()
    reshape = next(n for n in grad_model.graph.node if n.op_type == "Reshape" and n.name.startswith("grad/pool/")
                   and n.input[1].startswith("grad/pool/ints_"))
    index = next(i for i, t in enumerate(grad_model.graph.initializer) if t.name == reshape.input[1])
    grad_model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.array([7, -1, 5], np.int64), reshape.input[1]))
    with pytest.raises(MultisalError) as error:   # onnxruntime finds it when it loads the graph
        session = runtime.session(grad_model.SerializeToString(), "the gradient graph of m.onnx")
        runtime.run(session, {"x": x, TARGET_INPUT: np.array([0, 1])}, "the gradient graph of m.onnx")
    text = str(error.value)
    assert "\n" not in text and "onnxruntime_src" not in text and "grad/" not in text, text
    assert re.match(r"onnxruntime cannot (load|run) the gradient graph of m\.onnx "
                    r"\(the gradient of node 'pool', op Reshape\): ", text), text
