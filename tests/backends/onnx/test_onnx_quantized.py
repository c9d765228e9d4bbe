"""Int8 models as onnxruntime's quantiser makes them, explained through the straight-through
estimator (backends/onnx/grad/rules/quantization.py): torchvision families (random weights, seeded)
and EfficientNet-Lite0 (its real weights), exported to ONNX here, then quantised statically (QDQ
format, per tensor or per channel, int8 or uint8 activations, calibrated on scikit-image's photos;
one family also in QOperator format) and dynamically (quantize_dynamic).

The estimator is not the quantised model's derivative (that is zero almost everywhere), so there
is no exact reference: the maps of every gradient method must come out, and the vanilla gradient
and Grad-CAM++ maps must correlate with those of the float32 model they were quantised from
(Spearman's rank correlation of the gradient maps, Pearson's of the Grad-CAM++ maps, per image).
The bounds are a little below the correlations measured on these seeds (README, "Quantised and
half-precision models").

Each float model is exported once and each quantised version made once (module fixtures); inputs
are 64x64 (EfficientNet-Lite0: one 224x224 photo).
"""
import warnings

import numpy as np
import pytest
import skimage.data
import skimage.transform
import torch
from scipy.stats import pearsonr, spearmanr

import multisal as ms
from multisal import models

tvm = pytest.importorskip("torchvision.models")
quantization = pytest.importorskip("onnxruntime.quantization")
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field")
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TARGET = np.array([3, 7])


def photos(size, names=PHOTOS, preset=None):
    """scikit-image's photos resized to size x size, normalised as torchvision's models expect, or
    as a multisal preset says."""
    if preset:
        return ms.get_preset(preset).apply([getattr(skimage.data, name)() for name in names])
    batch = []
    for name in names:
        image = skimage.transform.resize(getattr(skimage.data, name)()[..., :3], (size, size), anti_aliasing=True)
        batch.append(((image - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def _mobilenet_v2():
    return tvm.MobileNetV2(num_classes=10, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]])


def _shufflenet_v2():
    return tvm.ShuffleNetV2([2, 1, 1], [16, 32, 64, 128, 256], num_classes=10)


# name -> (factory, input size, photos explained, the variants and their bounds: variant ->
# (Spearman of the gradient maps, Pearson of the Grad-CAM++ maps)). Variants: "qdq" (static, QDQ,
# int8, per tensor), "qdq-channel" (per channel), "qdq-uint8" (uint8 activations), "dynamic"
# (quantize_dynamic, int8 weights), "qoperator" (static, QOperator format).
FAMILIES = {
    "resnet": (lambda: tvm.resnet18(num_classes=10), 64, 2,
               {"qdq": (0.75, 0.99), "dynamic": (0.8, 0.99), "qoperator": (0.72, 0.99)}),
    "mobilenet_v2": (_mobilenet_v2, 64, 2, {"qdq-uint8": (0.72, 0.99), "dynamic": (0.75, 0.99)}),
    "squeezenet": (lambda: tvm.squeezenet1_1(num_classes=10), 64, 2, {"qdq-channel": (0.75, 0.99), "dynamic": (0.8, 0.99),
                                                                   "qoperator": (0.7, 0.99)}),
    "shufflenet_v2": (_shufflenet_v2, 64, 2, {"qdq-channel": (0.85, 0.99), "dynamic": (0.85, 0.99)}),
    # Dynamic quantisation changes EfficientNet-Lite0 itself (per-tensor int8 depthwise weights): its
    # logits move away from the float model's, and its maps with them (README).
    "efficientnet_lite0": (lambda: models.load("efficientnet-lite0"), 224, 1,
                           {"qdq-channel": (0.5, 0.98), "dynamic": (0.15, 0.9)}),
}
PRESETS = {"efficientnet_lite0": "efficientnet-lite"}   # the real weights' own normalisation
CASES = [(family, variant) for family, spec in FAMILIES.items() for variant in spec[3]]


class Reader(quantization.CalibrationDataReader):
    """Calibration data: one photo at a time."""

    def __init__(self, batch, input_name):
        self.feeds = iter([{input_name: batch[i:i + 1]} for i in range(len(batch))])

    def get_next(self):
        return next(self.feeds, None)


def quantise(source, target, variant, calibration):
    """source (.onnx, float32) quantised into target as `variant` says."""
    if variant == "dynamic":
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8)
        return
    formats = {"qoperator": quantization.QuantFormat.QOperator}
    activations = quantization.QuantType.QUInt8 if variant == "qdq-uint8" else quantization.QuantType.QInt8
    quantization.quantize_static(str(source), str(target), Reader(calibration, "input"),
                                 quant_format=formats.get(variant, quantization.QuantFormat.QDQ),
                                 per_channel=variant == "qdq-channel", activation_type=activations,
                                 weight_type=quantization.QuantType.QInt8)


class Family:
    """One family's float32 export, its explained photos and the float model's maps."""

    def __init__(self, name, folder):
        factory, size, count, _ = FAMILIES[name]
        torch.manual_seed(0)
        net = factory().eval()
        preset = PRESETS.get(name)
        self.x, self.folder = photos(size, PHOTOS[:count], preset), folder
        self.calibration = photos(size, PHOTOS[:4] if size > 64 else PHOTOS, preset)
        exported = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.from_numpy(self.x[:1]),), str(exported), dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        # What onnxruntime's quantiser asks for first (it needs initializers, not torch's Identity copies).
        self.float_path = folder / f"{name}.pre.onnx"
        quant_pre_process(str(exported), str(self.float_path), skip_symbolic_shape=True)
        self.target = TARGET[:count]
        self.maps = maps(load(self.float_path, folder), self.x, self.target)


def load(path, folder):
    return ms.load_backend("onnx", model=str(path), cache_dir=folder / "cache")


def maps(backend, x, target):
    return {"vanilla": ms.vanilla_gradient(backend, x, target), "gradcam_pp": ms.gradcam_pp(backend, x, target)}


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """(family, variant) -> (Family, the onnx backend of the quantised model), each made once."""
    folder = tmp_path_factory.mktemp("quantised")
    families, backends = {}, {}

    def get(name, variant):
        if name not in families:
            families[name] = Family(name, folder)
        family = families[name]
        if (name, variant) not in backends:
            path = folder / f"{name}.{variant}.onnx"
            quantise(family.float_path, path, variant, family.calibration)
            backends[name, variant] = load(path, folder)
        return family, backends[name, variant]

    return get


def correlations(got, ref):
    """Per image: Spearman of the gradient maps, Pearson of the Grad-CAM++ maps."""
    return ([spearmanr(g.ravel(), r.ravel())[0] for g, r in zip(got["vanilla"], ref["vanilla"])],
            [pearsonr(g.ravel(), r.ravel())[0] for g, r in zip(got["gradcam_pp"], ref["gradcam_pp"])])


@pytest.mark.parametrize("name, variant", CASES)
def test_quantised_maps_correlate_with_the_float_model(name, variant, quantised):
    family, backend = quantised(name, variant)
    got = maps(backend, family.x, family.target)
    for key, value in got.items():
        assert value.shape == family.maps[key].shape and np.isfinite(value).all() and np.abs(value).max() > 0, key
    spearman, pearson = correlations(got, family.maps)
    print(f"{name} {variant}: gradient Spearman {np.round(spearman, 3).tolist()}, "
          f"Grad-CAM++ Pearson {np.round(pearson, 3).tolist()}")
    low_spearman, low_pearson = FAMILIES[name][3][variant]
    assert min(spearman) >= low_spearman and min(pearson) >= low_pearson, (spearman, pearson)


@pytest.mark.parametrize("method, kwargs", [(ms.smoothgrad, dict(n=2)), (ms.integrated_gradients, dict(steps=2)),
                                            (ms.gradcam, {}), (ms.layercam, {})])
@pytest.mark.parametrize("variant", ["qdq", "dynamic", "qoperator"])
def test_gradient_methods_run_on_every_format(method, kwargs, variant, quantised):
    """Beyond the two compared above (the sessions are shared: no new gradient graph)."""
    family, backend = quantised("resnet", variant)
    result = method(backend, family.x, family.target, **kwargs)
    assert np.isfinite(result).all() and np.abs(result).max() > 0


def test_a_quantised_layer_is_shown_and_replaced_as_real_values(quantised):
    """QOperator: the default layer is an integer tensor, shown as (q - zp) s; fed back those
    values (quantised again, exactly), the model gives its own outputs."""
    family, backend = quantised("resnet", "qoperator")
    layer = backend.default_layer(family.x.shape[1:])
    assert layer in backend.quantised_layers()
    shown = backend.run(family.x, layers=[layer])
    assert shown.activations[layer].dtype.kind == "f" and np.abs(shown.activations[layer]).max() > 0
    replaced = backend.run(family.x, replace={layer: shown.activations[layer]})
    np.testing.assert_array_equal(replaced.outputs, shown.outputs)
