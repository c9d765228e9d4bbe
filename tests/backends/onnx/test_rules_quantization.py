"""Quantised ops (rules/quantization.py) beyond the table's finite-difference cases: what a QDQ
pair's gradient graph writes, and the inputs refused with one line naming the node."""
import numpy as np
import onnx
import pytest
from onnx import helper

from multisal.errors import MultisalError
from onnx_fd import check_input_gradient, classifier_head, make_model, run_gradient

RNG = np.random.default_rng(3)


def _model(nodes, initializers, opset=21, shape=(2, 2, 3, 3)):
    head, inits = classifier_head(shape, RNG)
    return make_model(nodes + head, shape, (shape[0], 3), {**inits, **initializers}, opset=opset)


def test_a_qdq_pair_writes_its_mask_alone():
    """DequantizeLinear's s and QuantizeLinear's 1 / s cancel: no product with the scale is written."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="pair_q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["h"], name="pair_dq")]
    model = _model(nodes, {"s": np.float32(0.25), "z": np.int8(0)})
    x = RNG.uniform(-3, 3, (2, 2, 3, 3)).astype(np.float32)
    _, graph = run_gradient(model, x, [0, 1])
    written = {n.op_type for n in graph.graph.node if n.name.startswith("grad/pair_")}
    assert written == {"Clip", "Equal", "Cast", "Mul"}
    # Inside [-32, 31.75] nothing is clipped: the gradient is the identity's.
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    del reference.graph.node[:2]
    reference.graph.node.insert(0, helper.make_node("Identity", ["x"], ["h"]))
    check_input_gradient(model, x, [0, 1], reference=reference)


def test_blocked_quantisation_of_an_activation_is_refused_naming_the_node():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="blocked_q", axis=3, block_size=3),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["h"], name="blocked_dq", axis=3, block_size=3)]
    model = _model(nodes, {"s": np.full((2, 2, 3, 1), 0.25, np.float32), "z": np.zeros((2, 2, 3, 1), np.int8)})
    with pytest.raises(MultisalError, match="DequantizeLinear node 'blocked_dq': blocked quantisation"):
        run_gradient(model, RNG.standard_normal((2, 2, 3, 3)).astype(np.float32), [0, 1])


def test_an_integer_layer_without_a_scale_is_refused():
    """A Cast to int32 of a quantised tensor has no scale of its own: it cannot be shown as real values."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("Identity", ["q"], ["i"]),
             helper.make_node("Cast", ["i"], ["wide"], to=onnx.TensorProto.INT32),
             helper.make_node("Cast", ["wide"], ["h"], to=onnx.TensorProto.FLOAT)]
    model = _model(nodes, {"s": np.float32(0.25), "z": np.int8(0)})
    with pytest.raises(MultisalError, match="layer 'wide' is an integer tensor with no scale"):
        run_gradient(model, RNG.standard_normal((2, 2, 3, 3)).astype(np.float32), [0, 1], layers=["wide"])
