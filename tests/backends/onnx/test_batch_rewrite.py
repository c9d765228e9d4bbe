"""The batch rewrite of models exported with a fixed batch of 1 (backends/onnx/batch.py), on small
hand-built graphs of each construction that writes the batch into constants, against the original
model run one image at a time; and the soundness check's shapes-before-values rule."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from multisal.backends.onnx.model import prepare_model, same_outputs
from multisal.backends.onnx.batch import free_batch
from onnx_fd import make_model

RNG = np.random.default_rng(11)
C = 4


def _weights(*shape):
    return RNG.standard_normal(shape) * 0.5


def _takes_a_batch(model, batch=3):
    """The model prepared as the backend prepares it takes a batch, and on one its outputs are
    those of the original model run one image at a time (checked here, apart from the rewrite's
    own check)."""
    prepared = prepare_model(model)
    assert not prepared.batch_one
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = RNG.standard_normal((batch, *dims[1:])).astype(np.float32)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rewritten = ort.InferenceSession(prepared.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = rewritten.run(None, {"x": x})
    for k, expected in enumerate(zip(*[original.run(None, {"x": x[i:i + 1]}) for i in range(batch)])):
        np.testing.assert_allclose(got[k], np.concatenate(expected), rtol=1e-5, atol=1e-6)
    return prepared.model


def _patch_tokens(opset):
    """x (1, C, 4, 4) -> 2x2 patches (1, 4, C), a ViT's patch embedding with its batch of 1 written
    into the Reshape's target."""
    nodes = [helper.make_node("Conv", ["x", "Wp"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "flat"], ["pf"]),
             helper.make_node("Transpose", ["pf"], ["tokens"], perm=[0, 2, 1])]
    return nodes, {"Wp": _weights(C, C, 2, 2), "flat": np.array([1, C, 4], np.int64)}


def test_class_and_distillation_tokens_expanded_and_concatenated():
    """DeiT's prefix tokens: constants (1, 1, C) expanded to the batch of 1 (a constant Expand
    target) and concatenated before the patch tokens; the classifier reads token 0 with a Gather."""
    nodes, inits = _patch_tokens(17)
    nodes += [helper.make_node("Expand", ["cls", "one_token"], ["cls_b"]),
              helper.make_node("Concat", ["cls_b", "dist", "tokens"], ["t"], axis=1),
              helper.make_node("Add", ["t", "pos"], ["tp"]),
              helper.make_node("MatMul", ["tp", "Wm"], ["m"]),
              helper.make_node("Softmax", ["m"], ["s"], axis=1),
              helper.make_node("Gather", ["s", "zero"], ["first"], axis=1),
              helper.make_node("Gemm", ["first", "Wh"], ["y"], transB=1)]
    inits.update(cls=_weights(1, 1, C), dist=_weights(1, 1, C), one_token=np.array([1, 1, C], np.int64),
                 pos=_weights(1, 6, C), Wm=_weights(C, C), zero=np.array(0, np.int64), Wh=_weights(3, C))
    rewritten = _takes_a_batch(make_model(nodes, (1, C, 4, 4), (1, 3), inits))
    assert {"Tile"} <= {n.op_type for n in rewritten.graph.node}


def test_window_partition_attention_and_reverse():
    """Swin's windows: (1, 8, 8, C) viewed as (1, 2, 4, 2, 4, C), windows to the front (4, 16, C)
    (the batch times 4 windows), attention with a constant per-window mask (4, 16, 16) that does
    not broadcast over the batch, and the windows put back (1, 8, 8, C)."""
    nodes = [helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["nhwc", "split"], ["parts"]),
             helper.make_node("Transpose", ["parts"], ["grouped"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["grouped", "windows"], ["w"]),
             helper.make_node("MatMul", ["w", "Wq"], ["q"]),
             helper.make_node("Transpose", ["w"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["attn"], axis=-1),
             helper.make_node("MatMul", ["attn", "w"], ["o"]),
             helper.make_node("Reshape", ["o", "unsplit"], ["o6"]),
             helper.make_node("Transpose", ["o6"], ["o6t"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["o6t", "image"], ["o4"]),
             helper.make_node("ReduceMean", ["o4"], ["pooled"], axes=[1, 2], keepdims=0),
             helper.make_node("Gemm", ["pooled", "Wh"], ["y"], transB=1)]
    inits = {"split": np.array([1, 2, 4, 2, 4, C], np.int64), "windows": np.array([-1, 16, C], np.int64),
             "Wq": _weights(C, C), "mask": _weights(4, 16, 16), "unsplit": np.array([1, 2, 2, 4, 4, C], np.int64),
             "image": np.array([1, 8, 8, C], np.int64), "Wh": _weights(3, C)}
    _takes_a_batch(make_model(nodes, (1, C, 8, 8), (1, 3), inits))


def test_reshape_targets_gathered_from_the_shape():
    """Swin's patch merging as TorchScript exports it: the target (1, H/2, 2, W/2, 2, C) is a Concat
    of the constant 1 for the batch and of H and W gathered from the Shape of the tensor and halved
    at run time; another target copies the batch from the Shape (Gather at index 0) and must stay."""
    nodes = [helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),                 # (1, 4, 4, C)
             helper.make_node("Shape", ["nhwc"], ["shape"])]
    pieces = ["one"]
    for axis in (1, 2):
        nodes += [helper.make_node("Gather", ["shape", f"i{axis}"], [f"d{axis}"], axis=0),
                  helper.make_node("Div", [f"d{axis}", "two"], [f"h{axis}"]),
                  helper.make_node("Unsqueeze", [f"h{axis}", "axis0"], [f"u{axis}"])]
        pieces += [f"u{axis}", "two1"]
    nodes += [helper.make_node("Concat", pieces + ["channels"], ["target"], axis=0),
              helper.make_node("Reshape", ["nhwc", "target"], ["parts"]),                        # (1, 2, 2, 2, 2, C)
              helper.make_node("Transpose", ["parts"], ["merged"], perm=[0, 1, 3, 4, 2, 5]),
              helper.make_node("Gather", ["shape", "i0"], ["n"], axis=0),
              helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
              helper.make_node("Concat", ["n1", "rest"], ["flat_target"], axis=0),
              helper.make_node("Reshape", ["merged", "flat_target"], ["flat"]),                  # (1, 16 * C)
              helper.make_node("Gemm", ["flat", "Wh"], ["y"], transB=1)]
    inits = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(2, np.int64),
             "two": np.array(2, np.int64), "two1": np.array([2], np.int64), "one": np.array([1], np.int64),
             "axis0": np.array([0], np.int64), "channels": np.array([C], np.int64), "rest": np.array([-1], np.int64),
             "Wh": _weights(3, 16 * C)}
    _takes_a_batch(make_model(nodes, (1, C, 4, 4), (1, 3), inits, opset=13))


def test_gather_indices_fixed_for_one_image():
    """The dynamo exporter's as_strided: a pooled (1, C, 1, 1) flattened to (C,) and read back
    through a constant index array (1, C, 1, 1) into the batch axis, here in reversed order."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1),
             helper.make_node("Reshape", ["m", "all"], ["flat"]),
             helper.make_node("Gather", ["flat", "index"], ["strided"], axis=0),
             helper.make_node("Reshape", ["strided", "rows"], ["r"]),
             helper.make_node("Gemm", ["r", "Wh"], ["y"], transB=1)]
    inits = {"all": np.array([-1], np.int64), "index": np.arange(C)[::-1].reshape(1, C, 1, 1).astype(np.int64),
             "rows": np.array([1, C], np.int64), "Wh": _weights(3, C)}
    _takes_a_batch(make_model(nodes, (1, C, 4, 4), (1, 3), inits, opset=13))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_recurrent_initial_states_take_the_batch(exporter):
    """sequencer2d's rows: (1, H, W, C) -> (1*H, W, C) sequences, a bidirectional LSTM whose zero
    initial states (2, 1*H, C) are a constant (dynamo), or a constant expanded to a shape gathered
    from the sequences' Shape (TorchScript), the rows put back."""
    hidden = 3
    nodes = [helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["nhwc", "rows"], ["seq"]),                          # (4, 4, C)
             helper.make_node("Transpose", ["seq"], ["tbi"], perm=[1, 0, 2])]
    state = "h0"
    if exporter == "torchscript":
        nodes += [helper.make_node("Shape", ["tbi"], ["shape"]),
                  helper.make_node("Gather", ["shape", "one"], ["count"], axis=0),
                  helper.make_node("Unsqueeze", ["count", "axis0"], ["count1"]),
                  helper.make_node("Concat", ["two", "count1", "width"], ["state_shape"], axis=0),
                  helper.make_node("Expand", ["h0", "state_shape"], ["h0e"])]
        state = "h0e"
    nodes += [helper.make_node("LSTM", ["tbi", "W", "R", "B", "", state, state], ["Y"], hidden_size=hidden,
                               direction="bidirectional"),
             helper.make_node("Transpose", ["Y"], ["bt"], perm=[2, 0, 1, 3]),
             helper.make_node("Reshape", ["bt", "back"], ["out"]),                            # (1, 4, 4, 2 * hidden)
             helper.make_node("ReduceMean", ["out"], ["pooled"], axes=[1, 2], keepdims=0),
             helper.make_node("Gemm", ["pooled", "Wh"], ["y"], transB=1)]
    inits = {"rows": np.array([4, 4, C], np.int64), "W": _weights(2, 4 * hidden, C), "R": _weights(2, 4 * hidden, hidden),
             "B": _weights(2, 8 * hidden), "h0": np.zeros((2, 4, hidden)),
             "back": np.array([1, 4, 4, 2 * hidden], np.int64), "Wh": _weights(3, 2 * hidden),
             "one": np.array(1, np.int64), "axis0": np.array([0], np.int64), "two": np.array([2], np.int64),
             "width": np.array([hidden], np.int64)}
    _takes_a_batch(make_model(nodes, (1, C, 4, 4), (1, 3), inits, opset=14))


def test_flatten_target_after_an_op_the_rewrite_does_not_follow():
    """An Einsum that drops an axis loses the batch axis to the rewrite; the classifier's flatten
    target (1, C*4) after it is then read with the batch first, as exporters write it."""
    nodes = [helper.make_node("Einsum", ["x"], ["rows"], equation="nchw->nch"),
             helper.make_node("Reshape", ["rows", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "Wh"], ["y"], transB=1)]
    inits = {"flat": np.array([1, C * 4], np.int64), "Wh": _weights(3, C * 4)}
    _takes_a_batch(make_model(nodes, (1, C, 4, 4), (1, 3), inits, opset=13))


def test_shapes_are_compared_before_values():
    """A model whose output does not depend on the input's values, summed over the batch axis: the
    rewrite takes a batch of 2 and gives one row, (1, 10), equal to each image's row, so np.allclose
    would broadcast it against the expected (2, 10) and accept. The shapes differ: refused."""
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"]),
             helper.make_node("Add", ["z", "c"], ["zc"]),
             helper.make_node("ReduceSum", ["zc", "axes"], ["s"], keepdims=1),
             helper.make_node("Reshape", ["s", "shape"], ["y"])]
    inits = {"zero": np.zeros(1), "c": _weights(1, 10), "axes": np.array([0], np.int64),
             "shape": np.array([1, 10], np.int64)}
    model = make_model(nodes, (1, 10), (1, 10), inits, opset=13)
    rewritten = free_batch(model)
    assert rewritten is not None
    x = RNG.standard_normal((2, 10)).astype(np.float32)
    batched = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert batched.shape == (1, 10) and np.allclose(batched, np.zeros((2, 10)) + batched)   # the trap
    assert not same_outputs(model, rewritten, "x", [1, 10])
    assert prepare_model(model).batch_one
