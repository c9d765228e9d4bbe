"""Old opsets: a gradient graph uses only ops that exist at the opset its model declares; where a
rule needs a newer one (opset 7 has no Where, Expand or ConstantOfShape, nor MaxPool's Indices),
the graph is built on the model converted by onnx.version_converter, checked to give the same
outputs, and says so. torchvision exports at opsets 9 and 10 (TorchScript exporter) against torch
autograd, hand-built opset-7 and opset-8 graphs against float64 finite differences."""
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import multisal as ms
from helpers import assert_agree
from multisal.backends.onnx.grad.builder import OPSET_CONVERSION, GradientRequest, build_gradient_model
from onnx_fd import check_input_gradient, draw_distinct, make_model

tvm = pytest.importorskip("torchvision.models")

TARGET = np.array([3, 7])
FAMILIES = {
    # MaxPool (whose rule wrote Mod, which came at opset 10), Add, GlobalAveragePool, Gemm
    "resnet18": lambda: tvm.resnet18(num_classes=10),
    # Clip with min/max as attributes (inputs from opset 11)
    "mobilenet_v2": lambda: tvm.MobileNetV2(num_classes=10, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2]]),
    # BatchNormalization, AveragePool, Concat, and at opset 9 a Pad with its pads as an attribute
    "densenet": lambda: tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                     num_classes=10),
}
RNG = np.random.default_rng(9)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opsets")
    cache = {}

    def get(name, opset):
        if name not in cache:
            torch.manual_seed(0)
            net = FAMILIES[name]().eval()
            x = torch.randn(2, 3, 64, 64).numpy()
            reference = ms.load_backend("torch", model=net, fold_batchnorm=False).run(x, "logit", TARGET, input_grad=True)
            cache[name] = net, x, reference
        net, x, reference = cache[name]
        path = folder / f"{name}.{opset}.onnx"
        if not path.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        return path, x, reference
    return get


@pytest.mark.parametrize("opset", [9, 10])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_torchvision_export_at_an_old_opset(name, opset, exported, tmp_path):
    path, x, reference = exported(name, opset)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == opset
    grad = build_gradient_model(model, GradientRequest(), x.shape[1:])
    # Built at the model's own opset, every op of it checked there (Mod, for one, exists from 10 only).
    assert grad.opset_import[0].version == opset and OPSET_CONVERSION not in {p.key for p in grad.metadata_props}
    onnx.checker.check_model(grad)
    bo = ms.load_backend("onnx", model=str(path), cache_dir=tmp_path)
    got = bo.run(x, "logit", TARGET, input_grad=True)
    assert_agree(got.outputs, reference.outputs)
    assert_agree(got.input_grad, reference.input_grad)


def _opset7_model(kind):
    """Hand-built graphs of ops as opset 7 defines them."""
    w = RNG.standard_normal((3, 2, 3, 3))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])
    if kind == "maxpool":   # MaxPool has no Indices output before opset 8
        nodes = [conv, helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                 helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
        inits = {"w": w, "W": RNG.standard_normal((4, 12)), "b": RNG.standard_normal(4)}
    else:                   # GlobalAveragePool's gradient is an Expand, which came at opset 8
        nodes = [conv, helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["m"]),
                 helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                 helper.make_node("Concat", ["a", "m"], ["cc"], axis=1),
                 helper.make_node("GlobalAveragePool", ["cc"], ["g"]),
                 helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
        inits = {"w": w, "W": RNG.standard_normal((4, 6)), "b": RNG.standard_normal(4)}
    return make_model(nodes, (2, 2, 4, 4), (2, 4), inits, opset=7)


@pytest.mark.parametrize("kind", ["maxpool", "swish_pools"])
def test_opset7_graph_is_differentiated_on_the_converted_model(kind, caplog):
    model = _opset7_model(kind)
    x = draw_distinct(RNG, (2, 2, 4, 4))
    with caplog.at_level(logging.WARNING, logger="multisal"):
        check_input_gradient(model, x, [0, 3])       # against finite differences of the opset-7 model itself
    notices = [r.getMessage() for r in caplog.records if "onnx.version_converter" in r.getMessage()]
    assert len(notices) == 1 and "declares opset 7" in notices[0] and "converted to opset 11" in notices[0]
    assert "\n" not in notices[0]
    grad = build_gradient_model(model, GradientRequest(), x.shape[1:])
    assert grad.opset_import[0].version == 11
    assert "declares opset 7" in {p.key: p.value for p in grad.metadata_props}[OPSET_CONVERSION]


def test_opset8_maxpool_gradient_at_its_own_opset_but_for_the_objective(caplog):
    """At opset 8 MaxPool has its Indices, and the rule writes no Mod; only the objective's Where
    (opset 9) needs the conversion, and the notice names it."""
    model = _opset7_model("maxpool")
    model.opset_import[0].version = 8
    onnx.checker.check_model(model)
    x = draw_distinct(RNG, (2, 2, 4, 4))
    with caplog.at_level(logging.WARNING, logger="multisal"):
        check_input_gradient(model, x, [1, 2])
    assert any("Where" in r.getMessage() and "objective" in r.getMessage() for r in caplog.records)
