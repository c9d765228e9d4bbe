"""Hand-built graphs for what torch does not emit, and the builder's contract at its edges."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import multisal as ms
from helpers import assert_agree
from onnx_fd import check_input_gradient, make_model, run_gradient

RNG = np.random.default_rng(7)


def test_attention_block_against_finite_differences():
    """x (N,T,D) -> LayerNorm -> Q,K,V -> softmax(QK^T/sqrt(d)) V -> + x -> mean over T -> logits."""
    T, D = 4, 6
    inits = {"ln_s": RNG.uniform(0.5, 1.5, D), "ln_b": RNG.standard_normal(D) * 0.1,
             "Wq": RNG.standard_normal((D, D)) * 0.4, "Wk": RNG.standard_normal((D, D)) * 0.4,
             "Wv": RNG.standard_normal((D, D)) * 0.4, "scale": [1 / np.sqrt(D)],
             "Wo": RNG.standard_normal((D, 3)) * 0.5, "perm_shape": np.array([0, T, 2, D // 2], np.int64),
             "merge_shape": np.array([0, T, D], np.int64)}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["h"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "Wq"], ["q"]), helper.make_node("MatMul", ["h", "Wk"], ["k"]),
        helper.make_node("MatMul", ["h", "Wv"], ["v"]),
        # two heads: (N,T,D) -> (N,T,2,D/2) -> (N,2,T,D/2)
        helper.make_node("Reshape", ["q", "perm_shape"], ["q4"]), helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "perm_shape"], ["k4"]), helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v", "perm_shape"], ["v4"]), helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"]), helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "vh"], ["ctx"]), helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"]), helper.make_node("Add", ["merged", "x"], ["res"]),
        helper.make_node("ReduceMean", ["res"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "Wo"], ["y"]),
    ]
    model = make_model(nodes, (2, T, D), (2, 3), inits, opset=17)
    x = RNG.standard_normal((2, T, D)).astype(np.float32)
    check_input_gradient(model, x, [0, 2])
    check_input_gradient(model, x, [1, 1], objective="log_softmax")


def test_an_op_without_a_rule_names_op_node_and_opset(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Hardmax", ["c"], ["h"], name="the_hardmax", axis=1),
             helper.make_node("Flatten", ["h"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    model = make_model(nodes, ("N", 2, 3, 3), ("N", 3), {"w": RNG.standard_normal((2, 2, 1, 1)),
                                                         "W": RNG.standard_normal((18, 3))}, opset=13)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    be = ms.load_backend("onnx", model=str(tmp_path / "m.onnx"), cache_dir=tmp_path)
    with pytest.raises(ms.MultisalError, match="no gradient rule for op Hardmax \\(node 'the_hardmax', opset 13\\)"):
        ms.vanilla_gradient(be, np.ones((1, 2, 3, 3), np.float32))
    # Grad-CAM at a layer after the Hardmax needs no rule for it: the backward stops there.
    assert ms.gradcam(be, np.ones((1, 2, 3, 3), np.float32), layer="h", upsample=False).shape == (1, 3, 3)


def test_sequence_output_region_over_time(tmp_path):
    """(N,C,H,W) -> (N,T,C) like a text recogniser: why did channel 2 fire at steps 1..3?"""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[2], keepdims=0),
             helper.make_node("Transpose", ["m"], ["y"], perm=[0, 2, 1])]
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = make_model(nodes, ("N", 3, 5, 6), ("N", 6, 4), {"w": w}, opset=13)
    onnx.save_model(model, str(tmp_path / "seq.onnx"))
    be = ms.load_backend("onnx", model=str(tmp_path / "seq.onnx"), cache_dir=tmp_path)
    x = RNG.standard_normal((2, 3, 5, 6)).astype(np.float32)
    got = ms.vanilla_gradient(be, x, ms.region(2, box=(1, 4)), channel_reduce=None, abs=False)
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x).requires_grad_(True)
    y = torch.nn.functional.conv2d(xt, torch.from_numpy(w), padding=1).mean(2).transpose(1, 2)
    (ref,) = torch.autograd.grad(y[:, 1:4, 2].sum(), xt)
    assert_agree(got, ref.numpy())


def test_fixed_batch_that_cannot_be_rewritten_loops(tmp_path):
    """A Flatten at axis 0 puts the batch into the features, (1, 12) at batch 1 and (1, 12 N) at N:
    no rewrite makes that take a batch, and the backend runs one by one."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["f"], axis=0),
             helper.make_node("MatMul", ["f", "W"], ["y"])]
    W = RNG.standard_normal((12, 3)).astype(np.float32)
    model = make_model(nodes, (1, 3, 2, 2), (1, 3), {"W": W}, opset=13)
    onnx.save_model(model, str(tmp_path / "fixed.onnx"))
    be = ms.load_backend("onnx", model=str(tmp_path / "fixed.onnx"), cache_dir=tmp_path)
    assert be.batch_one and be.batch_size((3, 2, 2)) == 1
    x = RNG.standard_normal((3, 3, 2, 2)).astype(np.float32)
    got = ms.vanilla_gradient(be, x, [0, 1, 2], channel_reduce=None, abs=False)
    expected = (x > 0) * W.T[[0, 1, 2]].reshape(3, 3, 2, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_export_grad_keeps_a_batch_of_one_where_the_backend_does(tmp_path):
    """A sum over the batch axis rewrites to a free batch without complaint but mixes the images:
    on a batch of 2 its output is (1, 3), where one image at a time gives (2, 3). Shapes are
    compared before values (allclose would broadcast the two), so the backend keeps a batch of 1;
    export-grad prepares the model the same way and writes a gradient graph of batch 1."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=1),
             helper.make_node("Reshape", ["s", "shape"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    rng = np.random.default_rng(7)   # its own draws: the tests after it keep theirs
    W = rng.standard_normal((12, 3)).astype(np.float32)
    model = make_model(nodes, (1, 3, 2, 2), (1, 3), {"axes": np.array([0], np.int64),
                                                      "shape": np.array([1, 12], np.int64), "W": W}, opset=13)
    onnx.save_model(model, str(tmp_path / "fixed.onnx"))
    be = ms.load_backend("onnx", model=str(tmp_path / "fixed.onnx"), cache_dir=tmp_path)
    assert be.batch_one
    path = ms.export_gradient_graph(str(tmp_path / "fixed.onnx"), tmp_path / "grad.onnx")
    grad_model = onnx.load(str(path))
    assert grad_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = np.concatenate([session.run(["multisal_grad:x"], {"x": x[i:i + 1], "multisal_target": np.array([1])})[0]
                               for i in range(2)])
    expected = (x > 0) * W.T[1].reshape(1, 3, 2, 2)
    np.testing.assert_allclose(exported, expected, rtol=1e-6)
    np.testing.assert_allclose(ms.vanilla_gradient(be, x, 1, channel_reduce=None, abs=False), expected, rtol=1e-6)


@pytest.mark.parametrize("batch", ["N", 2])
def test_data_dependent_indices_are_not_taken_for_constants(batch):
    """Gather at the argmax of the batch's channel-wise maximum: on the probe's zero input that
    index is 0 at every batch size, on real inputs it is elsewhere. The gradient must follow the
    index the input makes, for a free and for a fixed batch."""
    nodes = [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("ReduceMax", ["flat"], ["peak"], axes=[0], keepdims=0),
             helper.make_node("ArgMax", ["peak"], ["where"], axis=0, keepdims=1),
             helper.make_node("Gather", ["flat", "where"], ["y"], axis=1)]
    model = make_model(nodes, (batch, 3, 4, 4), (batch, 1), {"flat_shape": np.array([0, -1], np.int64)})
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    x.reshape(2, -1)[1, 29] = 5.0
    got = check_input_gradient(model, x)
    assert got.reshape(2, -1)[:, 29].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("variant, folded", [("initializer", True), ("from_shape", True), ("value", False),
                                             ("second_reader", False)])
def test_zero_pad_before_a_conv_is_folded_into_it(variant, folded):
    """x -> Pad (asymmetric, spatial) -> Conv (stride 2, its own asymmetric pads) -> Relu -> MatMul.
    A zero Pad that only the Conv reads becomes part of the Conv's pads, whether its pads are an
    initializer or computed from the input's shape (as torch's TorchScript exporter writes TF
    "same" padding); a Pad with another value or another reader stays. Gradients agree with finite
    differences either way."""
    inits = {"W": RNG.standard_normal((3, 2, 3, 3)) * 0.5, "Wf": RNG.standard_normal((36, 4)) * 0.3,
             "pads": np.array([0, 0, 1, 0, 0, 0, 1, 1], np.int64), "two": np.array([2, 2], np.int64),
             "zeros": np.array([0, 0], np.int64), "ones": np.array([1, 1], np.int64),
             "hw_begin": np.array([2], np.int64), "hw_end": np.array([4], np.int64), "half": np.array(0.5)}
    pad_inputs = ["x", "pads"] + (["half"] if variant == "value" else [])
    nodes = [helper.make_node("Pad", pad_inputs, ["padded"])]
    if variant == "from_shape":   # pads [0, 0, H % 2, W % 2, 0, 0, 1, 1] for H x W = 7 x 6
        nodes = [helper.make_node("Shape", ["x"], ["shape"]),
                 helper.make_node("Slice", ["shape", "hw_begin", "hw_end"], ["hw"]),
                 helper.make_node("Mod", ["hw", "two"], ["odd"]),
                 helper.make_node("Concat", ["zeros", "odd", "zeros", "ones"], ["computed_pads"], axis=0),
                 helper.make_node("Pad", ["x", "computed_pads"], ["padded"])]
    nodes += [helper.make_node("Conv", ["padded", "W"], ["c"], strides=[2, 2], pads=[1, 0, 0, 1]),
              helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
              helper.make_node("MatMul", ["f", "Wf"], ["y" if variant != "second_reader" else "scores"])]
    if variant == "second_reader":
        nodes += [helper.make_node("ReduceMean", ["padded"], ["mean"], axes=[1, 2, 3], keepdims=0),
                  helper.make_node("Reshape", ["mean", "column_shape"], ["mean2"]),
                  helper.make_node("Add", ["scores", "mean2"], ["y"])]
        inits["column_shape"] = np.array([-1, 1], np.int64)
    model = make_model(nodes, ("N", 2, 7, 6), ("N", 4), inits, opset=13)
    x = RNG.standard_normal((2, 2, 7, 6)).astype(np.float32)
    check_input_gradient(model, x, [1, 3])
    _, grad_model = run_gradient(model, x, [1, 3])
    assert ("Pad" in {n.op_type for n in grad_model.graph.node}) is not folded
