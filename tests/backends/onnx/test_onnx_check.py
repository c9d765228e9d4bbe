"""`multisal check MODEL.onnx` and ms.check_model: types, shapes, the batch, the ops on the input
gradient's path with and without a rule (from the rule registry), and the methods that work."""
import re

import numpy as np
import onnx
import pytest
from onnx import helper

import multisal as ms
from multisal.app.cli import main
from multisal.backends.onnx.grad import context
from multisal.methods import FORWARD_ONLY, METHODS
from onnx_fd import make_model

RNG = np.random.default_rng(5)


def _save(tmp_path, nodes, input_shape, output_shape, inits, name="m.onnx", opset=13):
    path = tmp_path / name
    onnx.save(make_model(nodes, input_shape, output_shape, inits, opset=opset), str(path))
    return str(path)


@pytest.fixture
def covered(tmp_path):
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm, with a Shape path beside it, a
    fixed batch of 1 the backend can rewrite."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]), helper.make_node("Shape", ["g"], ["s"]),
             helper.make_node("Reshape", ["g", "s2"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
    inits = {"w1": RNG.standard_normal((4, 2, 3, 3)), "w2": RNG.standard_normal((4, 4, 3, 3)),
             "s2": np.array([1, 4], np.int64), "W": RNG.standard_normal((3, 4)), "b": RNG.standard_normal(3)}
    return _save(tmp_path, nodes, (1, 2, 6, 6), (1, 3), inits)


@pytest.fixture
def uncovered(tmp_path):
    """Hardmax, which has no rule, between two Convs; free batch and free spatial size."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Hardmax", ["c"], ["h"], name="the_hardmax", axis=1),
             helper.make_node("Conv", ["h", "w2"], ["late"], name="late_conv"),
             helper.make_node("ReduceMean", ["late"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["y"])]
    inits = {"w": RNG.standard_normal((2, 2, 1, 1)), "w2": RNG.standard_normal((2, 2, 1, 1)),
             "W": RNG.standard_normal((2, 3))}
    return _save(tmp_path, nodes, ("N", 2, "H", "W"), ("N", 3), inits, name="hardmax.onnx")


def test_every_op_on_the_path_has_a_rule(covered, capsys):
    report = ms.check_model(covered)
    assert report.gradients_available and report.exit_status == 0
    assert report.opset == 13
    # Shapes as the backend runs the model: the batch it could rewrite is free.
    assert report.inputs == [("x", "float32", ["N", 2, 6, 6])] and report.outputs[0][:3] == ("y", "float32", ["N", 3])
    assert report.batch.startswith("fixed at 1 in the file; rewritten to any batch")
    assert dict(report.with_rule) == {"Conv": 2, "Relu": 1, "GlobalAveragePool": 1, "Reshape": 1, "Gemm": 1}
    assert report.without_rule == {} and dict(report.not_differentiated) == {"Shape": 1}
    assert report.methods == list(METHODS)
    assert main(["check", covered]) == 0
    out = capsys.readouterr().out
    assert "opset: 13" in out and "input: x float32 [N, 2, 6, 6]" in out and "6 nodes, 6 with a gradient rule" in out


def test_an_old_opset_says_the_graph_may_be_built_on_a_converted_model(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
    path = _save(tmp_path, nodes, ("N", 2, 4, 4), ("N", 3), {"w": RNG.standard_normal((4, 2, 1, 1)),
                                                             "W": RNG.standard_normal((3, 4)), "b": np.zeros(3)}, opset=9)
    report = ms.check_model(path)
    assert report.opset == 9 and report.gradients_available
    assert "below opset 11" in str(report) and "onnx.version_converter" in str(report)


def test_an_op_without_a_rule_points_to_the_forward_only_methods(uncovered, capsys):
    report = ms.check_model(uncovered, input_shape=(2, 4, 4))
    assert not report.gradients_available and report.exit_status == 3
    assert report.without_rule == {"Hardmax": ["the_hardmax"]}
    assert dict(report.with_rule) == {"Conv": 2, "ReduceMean": 1, "MatMul": 1}
    # Grad-CAM at the last Conv needs no rule for the Hardmax before it.
    assert report.layers_with_gradients == ["h", "late"] and report.default_layer == "late"
    assert set(FORWARD_ONLY) <= set(report.methods) and "gradcam" in report.methods
    assert "vanilla_gradient" not in report.methods
    assert ms.gradcam(ms.load_backend("onnx", model=uncovered), np.ones((1, 2, 4, 4), np.float32),
                      upsample=False).shape == (1, 4, 4)
    assert main(["check", uncovered, "--shape", "2", "4", "4"]) == 3
    out = capsys.readouterr().out
    assert "without a rule: Hardmax 1 ('the_hardmax')" in out
    assert re.search(r"forward-only methods work: .*occlusion, rise", out)
    # Without a size the model is not probed, and the path still is walked (from inferred types).
    unprobed = ms.check_model(uncovered)
    assert unprobed.sample_shape is None and unprobed.without_rule == {"Hardmax": ["the_hardmax"]}
    assert "give --shape C H W" in str(unprobed)


def test_rules_are_looked_up_in_the_registry(uncovered, monkeypatch):
    """A rule registered anywhere counts at once: Hardmax is piecewise constant, a zero rule."""
    monkeypatch.setitem(context.RULES, "Hardmax", lambda ctx, node, dys: [None])
    report = ms.check_model(uncovered, input_shape=(2, 4, 4))
    assert report.gradients_available and report.with_rule["Hardmax"] == 1


def test_check_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert re.search(r"^examples?:\s+multisal check \S+\.onnx", text, re.M)
    assert "Exit status 0 when" in text and "3 when only the forward-only methods" in text


def test_a_file_that_is_no_model_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert main(["check", str(tmp_path / "bad.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"multisal: error: cannot read ONNX model {str(tmp_path / 'bad.onnx')!r}")
