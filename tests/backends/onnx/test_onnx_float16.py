"""Half-precision ONNX models: float16 conversions of torchvision families and of EfficientNet-Lite0
(onnxconverter-common's convert_float_to_float16, with float16 inputs and with keep_io_types=True),
and a mixed-precision one that casts between float16 and float32 inside, against torch autograd on
the float32 model each was converted from.

A float16 model is another function than its float32 original: its weights and activations are
rounded to 11 significant bits. Its outputs and its gradients at the Grad-CAM layers stay within
RELATIVE_L2 of float32 autograd. Its input gradient can differ more: between the input and the
first layers the rounding moves which element of a MaxPool window is the largest and which side of
a ReLU/ReLU6 kink an activation falls, and a gradient that took another path is a different
gradient. There the reference for what float16 allows is torch's own autograd on the float16 model
(torch CPU half precision): the ONNX gradient graph must be no further from float32 than that, by
INPUT_MARGIN. A wrong rule is off by far more than either bound (a relative L2 of order 1).

Every model is exported once for the module (torch's TorchScript exporter, the faster one) and
converted once per conversion; batch 2, 64x64 inputs, random weights where the family is
torchvision's, EfficientNet-Lite0's packaged ImageNet weights.
"""
import copy
import warnings

import numpy as np
import onnx
import pytest
import torch

import multisal as ms
from helpers import agreement
from multisal import models

float16 = pytest.importorskip("onnxconverter_common.float16")
tvm = pytest.importorskip("torchvision.models")
from torchvision.models.regnet import BlockParams  # noqa: E402

# The bounds the README states ("Half precision"), with what was measured on these models there.
RELATIVE_L2 = 2e-2
INPUT_MARGIN = 1.5
TARGET = np.array([3, 7])
SIZE = 64

FAMILIES = {
    "resnet18": lambda: tvm.resnet18(num_classes=10),
    "densenet": lambda: tvm.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                                     num_classes=10),
    "squeezenet": lambda: tvm.squeezenet1_1(num_classes=10),
    "regnet": lambda: tvm.RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                                              se_ratio=0.25), num_classes=10),
    "efficientnet-lite0": lambda: models.load("efficientnet-lite0"),
}
CONVERSIONS = {"float16": {}, "keep_io_types": {"keep_io_types": True}}


def _before_default(bo, x):
    """What the node making the onnx default layer reads: DenseNet applies its last ReLU after its
    last module (features.norm5), so the torch default is norm5's output, that ReLU's input."""
    default = bo.default_layer(x.shape[1:])
    return next(n for n in bo.model.graph.node if default in n.output).input[0]


# Where the two backends' default layers are not the same point: (torch module, onnx tensor picker).
LAYERS = {"densenet": ("features.norm5", _before_default)}


def _torch_input_gradient(net, x, dtype):
    """d logit[TARGET] / d x by plain autograd on a copy of net in `dtype`."""
    copied = copy.deepcopy(net).to(dtype)
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    out = copied(xt)
    (dx,) = torch.autograd.grad(out[torch.arange(len(x)), torch.from_numpy(TARGET)].sum(), [xt])
    return dx.double().numpy()


class Model:
    """A family's float32 network, the torch references on one input, and its ONNX export."""

    def __init__(self, name, folder):
        torch.manual_seed(0)
        self.net = FAMILIES[name]().eval()
        self.x = torch.randn(2, 3, SIZE, SIZE).numpy()
        tb = ms.load_backend("torch", model=self.net, fold_batchnorm=False)
        self.name = name
        self.layer = LAYERS[name][0] if name in LAYERS else tb.default_layer(self.x.shape[1:])
        self.reference = tb.run(self.x, "logit", TARGET, layers=[self.layer], input_grad=True)
        self.half_input_grad = _torch_input_gradient(self.net, self.x, torch.float16)
        self.path = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(self.net, (torch.from_numpy(self.x),), str(self.path), dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        self.converted = {}

    def convert(self, conversion, **options):
        if conversion not in self.converted:
            path = self.path.with_suffix(f".{conversion}.onnx")
            onnx.save(float16.convert_float_to_float16(onnx.load(str(self.path)), **options), str(path))
            self.converted[conversion] = path
        return self.converted[conversion]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float16")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Model(name, folder)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _onnx_layer(bo, model):
    """The ONNX tensor at the torch layer compared (the activations must agree first)."""
    if model.name in LAYERS:
        return LAYERS[model.name][1](bo, model.x)
    return bo.default_layer(model.x.shape[1:])


def _assert_within(actual, expected, bound, what):
    rel_l2, _ = agreement(actual, expected)
    assert np.isfinite(rel_l2) and rel_l2 <= bound, f"{what}: relative L2 {rel_l2:.3e} > {bound:.3e}"


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_float16_gradients_agree_with_float32_autograd(name, conversion, exported, cache_dir):
    model = exported(name)
    path = model.convert(conversion, **CONVERSIONS[conversion])
    bo = ms.load_backend("onnx", model=str(path), cache_dir=cache_dir)
    assert bo.input_dtype == (np.float32 if conversion == "keep_io_types" else np.float16)
    layer = _onnx_layer(bo, model)
    got = bo.run(model.x, "logit", TARGET, layers=[layer], input_grad=True)
    ref = model.reference
    for value in (got.outputs, got.input_grad, got.activations[layer], got.gradients[layer]):
        assert value.dtype == np.float32
    _assert_within(got.outputs, ref.outputs, RELATIVE_L2, "outputs")
    _assert_within(got.activations[layer], ref.activations[model.layer], RELATIVE_L2, f"activation {layer}")
    _assert_within(got.gradients[layer], ref.gradients[model.layer], RELATIVE_L2, f"gradient at {layer}")
    half_error, _ = agreement(model.half_input_grad, ref.input_grad)
    _assert_within(got.input_grad, ref.input_grad, max(RELATIVE_L2, INPUT_MARGIN * half_error),
                   f"input gradient (torch float16 autograd: {half_error:.3e})")


def test_mixed_precision_model_casts_inside(exported, cache_dir):
    """Global pooling and the classifier kept in float32 (op_block_list): float16 convolutions
    meet float32 ops at Casts inside the graph, and each gradient step is in its tensor's type."""
    model = exported("resnet18")
    path = model.convert("mixed", keep_io_types=True, op_block_list=["GlobalAveragePool", "Flatten", "Gemm"])
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "Cast" for node in graph.node) >= 2
    bo = ms.load_backend("onnx", model=str(path), cache_dir=cache_dir)
    layer = _onnx_layer(bo, model)
    got = bo.run(model.x, "logit", TARGET, layers=[layer], input_grad=True)
    _assert_within(got.outputs, model.reference.outputs, RELATIVE_L2, "outputs")
    _assert_within(got.gradients[layer], model.reference.gradients[model.layer], RELATIVE_L2, f"gradient at {layer}")


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_gradient_graph_is_typed_consistently(conversion, exported, tmp_path):
    """Every float constant the gradient graph adds is in the type of the tensor it meets: strict
    type inference accepts the graph, and a float16 model's graph adds no float32 constant."""
    model = exported("squeezenet")
    path = model.convert(conversion, **CONVERSIONS[conversion])
    out = ms.export_gradient_graph(str(path), tmp_path / "grad.onnx", layers=[], input_shape=(3, SIZE, SIZE))
    grad = onnx.load(str(out))
    onnx.shape_inference.infer_shapes(grad, check_type=True, strict_mode=True)
    original = {init.name for init in onnx.load(str(path)).graph.initializer}
    added = [init for init in grad.graph.initializer if init.name not in original]
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert {init.data_type for init in added if init.data_type in float_types} == {onnx.TensorProto.FLOAT16}


def test_methods_run_on_a_float16_model(exported, cache_dir):
    """Grad-CAM++, SmoothGrad and Ablation-CAM (a forward pass with a layer replaced, fed in the
    layer's float16) on a float16 model give the float32 model's maps."""
    model = exported("resnet18")
    b16 = ms.load_backend("onnx", model=str(model.convert("float16")), cache_dir=cache_dir)
    b32 = ms.load_backend("onnx", model=str(model.path), cache_dir=cache_dir)
    x = model.x[:1]
    # Ablation-CAM at the stem's 64 channels: one forward pass per channel, 64 rather than layer4's 512.
    stem = b32.candidate_layers(x.shape[1:])[0][0]
    assert stem in b16.layer_names()
    for method, kwargs in ((ms.gradcam_pp, {}), (ms.ablationcam, {"layer": stem}), (ms.smoothgrad, {"n": 4})):
        half, full = method(b16, x, **kwargs), method(b32, x, **kwargs)
        assert half.dtype == np.float32
        bound = RELATIVE_L2 if method is not ms.smoothgrad else 0.1
        _assert_within(half, full, bound, method.__name__)


@pytest.mark.parametrize("computed", [False, True])
def test_batchnorm_with_float32_statistics_on_float16_data(computed, tmp_path):
    """From opset 15 BatchNormalization takes statistics of another float type than its input:
    float32 scale and variance on float16 data, as constants or computed in the graph (an Identity
    of them, which the rule cannot fold), against the same model all in float32."""
    rng = np.random.default_rng(2)
    values = {"w": rng.standard_normal((4, 2, 3, 3)), "s": rng.uniform(0.5, 1.5, 4), "b": rng.standard_normal(4),
              "m": rng.standard_normal(4), "v": rng.uniform(0.5, 1.5, 4), "W": rng.standard_normal((4, 3))}
    stats = ["s_used", "b", "m", "v_used"] if computed else ["s", "b", "m", "v"]

    def build(data_type):
        half = {"w": data_type, "W": data_type}
        inits = [onnx.numpy_helper.from_array(v.astype(np.float16 if half.get(k) == onnx.TensorProto.FLOAT16
                                                       else np.float32), k) for k, v in values.items()]
        nodes = [onnx.helper.make_node("Identity", ["s"], ["s_used"]), onnx.helper.make_node("Identity", ["v"], ["v_used"]),
                 onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                 onnx.helper.make_node("BatchNormalization", ["c", *stats], ["n"], epsilon=1e-3),
                 onnx.helper.make_node("Relu", ["n"], ["r"]), onnx.helper.make_node("GlobalAveragePool", ["r"], ["g"]),
                 onnx.helper.make_node("Flatten", ["g"], ["f"]), onnx.helper.make_node("MatMul", ["f", "W"], ["y"])]
        graph = onnx.helper.make_graph(nodes, "bn", [onnx.helper.make_tensor_value_info("x", data_type, ["N", 2, 6, 6])],
                                       [onnx.helper.make_tensor_value_info("y", data_type, ["N", 3])], inits)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)])
        model.ir_version = 8
        path = tmp_path / f"bn{data_type}.onnx"
        onnx.save(model, str(path))
        return ms.load_backend("onnx", model=str(path), cache_dir=tmp_path)

    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    half = build(onnx.TensorProto.FLOAT16).run(x, "logit", np.array([0, 2]), input_grad=True)
    full = build(onnx.TensorProto.FLOAT).run(x, "logit", np.array([0, 2]), input_grad=True)
    _assert_within(half.input_grad, full.input_grad, RELATIVE_L2, "input gradient")
