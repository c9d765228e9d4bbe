"""onnxruntime failures while a gradient graph runs: the one that came from a model's wrong output
declaration is fixed, and any other is one line naming the model's node it came from."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import multisal as ms
from multisal.backends.onnx import runtime

RNG = np.random.default_rng(11)


def _declared_wrong_sequence_model(path):
    """ddddocr's common OCR model in small: a fixed batch of 1, a free width, a convolution, then
    its tail: the sequence (T, N, features) reshaped to rows for a Gemm and back to (T, N,
    classes) with shapes computed from Shape at run time, which onnx's shape inference cannot
    follow, and that output declared by the exporter as (1, seqlen), one axis short.
    onnxruntime then took the declaration, planned the objective's Shape of the output as 2
    values, and failed inside: "Shape mismatch attempting to re-use buffer. {2} != {3}"."""
    w, wc = RNG.standard_normal((3, 1, 3, 3)).astype(np.float32), RNG.standard_normal((5, 12)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input1", "w"], ["conv"], pads=[1, 1, 1, 1]),        # (1, 3, 4, W)
             helper.make_node("Transpose", ["conv"], ["t"], perm=[3, 0, 1, 2]),                # (W, 1, 3, 4)
             helper.make_node("Reshape", ["t", "flat3"], ["seq"]),                             # (T=W, N, 12)
             helper.make_node("Shape", ["seq"], ["shape"]),
             *[helper.make_node("Gather", ["shape", f"i{k}"], [axis], axis=0) for k, axis in enumerate("TNC")],
             helper.make_node("Mul", ["T", "N"], ["TN"]),
             *[helper.make_node("Unsqueeze", [v], [f"u{v}"], axes=[0]) for v in ("TN", "C", "T", "N")],
             helper.make_node("Concat", ["uTN", "uC"], ["rows"], axis=0),
             helper.make_node("Reshape", ["seq", "rows"], ["flat"]),                           # (T*N, 12)
             helper.make_node("Gemm", ["flat", "wc"], ["logits"], transB=1),                   # (T*N, 5)
             helper.make_node("Concat", ["uT", "uN", "minus1"], ["tnc"], axis=0),
             helper.make_node("Reshape", ["logits", "tnc"], ["387"])]                          # (T, N, 5)
    inits = {"w": w, "wc": wc, "flat3": np.array([0, 0, -1]), "i0": np.array(0), "i1": np.array(1),
             "i2": np.array(2), "minus1": np.array([-1])}
    graph = helper.make_graph(nodes, "ocr", [helper.make_tensor_value_info("input1", onnx.TensorProto.FLOAT,
                                                                           [1, 1, 4, "image_width"])],
                              [helper.make_tensor_value_info("387", onnx.TensorProto.FLOAT, [1, "seqlen"])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return wc


def test_gradcam_pp_on_a_sequence_output_declared_one_axis_short(tmp_path):
    wc = _declared_wrong_sequence_model(tmp_path / "ocr.onnx")
    bo = ms.load_backend("onnx", model=str(tmp_path / "ocr.onnx"), cache_dir=tmp_path)
    # One column: one step, so the (T, N, 5) output has the batch of 1 first, as the methods read it.
    x = RNG.standard_normal((1, 1, 4, 1)).astype(np.float32)
    target = ms.region(2, box=(0, 1))
    cam = ms.gradcam_pp(bo, x, target=target, layer="conv", upsample=False, normalize=False)
    assert cam.shape == (1, 4, 1)
    # The objective is class 2 of the one step, sum_k wc[2, (k, h)] conv[0, k, h, 0]: its gradient is wc's row.
    result = bo.run(x, "logit", target, layers=["conv"])
    np.testing.assert_allclose(result.gradients["conv"], wc[2].reshape(1, 3, 4, 1), rtol=1e-6)


# What onnxruntime 1.32 said for ddddocr's model before the fix (its text, as raised).
RAW = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Shape node. "
       "Name:'objective/Shape_1' Status Message: /onnxruntime_src/onnxruntime/core/framework/op_kernel.cc:87 "
       "virtual OrtValue* onnxruntime::OpKernelContext::OutputMLValue(int, const onnxruntime::TensorShape&) "
       "[ONNXRuntimeError] : 1 : FAIL : Shape mismatch attempting to re-use buffer. {2} != {3}. Validate usage of "
       "dim_value (values should be > 0) and dim_param (all values with the same string should equate to the same "
       "size) in shapes in the model.\n")


# What onnxruntime said on loading the gradient graph of resnet18 exported at opset 9, before the
# MaxPool rule wrote Mod only from opset 10 on.
LOAD = ('[ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model. In Node, ("grad//maxpool/MaxPool/Mod_122", '
        'Mod, "", -1) : ("grad//maxpool/MaxPool/MaxPool_120:1": tensor(int64),"grad//maxpool/MaxPool/ints_121": '
        'tensor(int64),) -> ("grad//maxpool/MaxPool/Mod_122",) , Error No Op registered for Mod with domain_version of 9')


def test_an_invalid_gradient_node_is_named_by_its_model_node():
    text = str(runtime.failure(RuntimeError(LOAD), "load", "m.onnx"))
    assert text == ("onnxruntime cannot load m.onnx (the gradient of node '/maxpool/MaxPool', op Mod): This is an "
                    "invalid model. Error No Op registered for Mod with domain_version of 9"), text


@pytest.mark.parametrize("node, where", [
    ("objective/Shape_1", "(the objective on the model's output, node 'objective/Shape_1', op Shape)"),
    ("grad/Conv_3/Shape_2", "(the gradient of node 'Conv_3', op Shape)"),
])
def test_an_onnxruntime_failure_is_one_line_naming_the_node(node, where):
    text = str(runtime.failure(RuntimeError(RAW.replace("objective/Shape_1", node)), "run", "m.onnx"))
    assert text.startswith(f"onnxruntime cannot run m.onnx {where}: Shape mismatch attempting to re-use buffer"), text
    assert "\n" not in text and "ONNXRuntimeError" not in text and "onnxruntime_src" not in text, text
