"""The Chainer SmoothGrad write-up (seed 001), run as written in Chainer 7.8.1, against multisal's
Chainer backend; its maps, weights and input are saved for the main environment, where the torch
and ONNX backends must reproduce them (tests/test_chainer_reproduction.py) to DESIGN.md's bound.

The network is chainer.links.VGG16Layers(pretrained_model=None) (nothing is downloaded) with
deterministic, seeded weights, chosen so that two float32 implementations can agree to that bound.
Plain He-normal weights cannot: between two float32 implementations (Chainer and torch, torch
float32 and float64) a few of VGG16's 15M ReLU and max-pool decisions flip on every sample
(measured: 1 to 4), and float64 recomputed with float32's decisions reproduces the float32 gradient
to 2e-6, so the flips are the whole difference. With random-sign weights the input gradient is an
incoherent sum (the backward signal's participation ratio is 6e4 at pool3), so one flip moves it by
about sqrt(2 / 6e4): measured 1e-3 to 9e-3 relative L2 per flip, on up to 8% of the map's elements.
Neither the softmax (max 0.23), nor the argmax (same labels everywhere, top-2 log-probability
margins >= 0.02), nor the activations (half of each layer active, pre-activation std 50 to 110,
float32 rounding 1e-7 to 1e-6 of it) were at fault.

So the gradient is made to add up coherently: conv1_1's 64 filters are one shared He-normal filter
plus CONV1_OWN times their own; every later layer is a random nonnegative average of its inputs
(|N(0,1)| sqrt(pi/2) / fan_in, mean 1/fan_in) plus RANDOM_PART times He-normal weights; biases
are zero but fc8's, which has small random weights and random biases. The same flips now move the
gradient by 1e-6 to 3e-4 (measured: per sample at most 4e-4 relative L2 against Chainer, no map
element off by 1e-3 of the largest beyond one pixel). The softmax stays far from saturated (max
0.04 clean, 0.24 noisy) and, the noise raising every activation, the noisy samples' top class (877)
is not the clean photo's (645), by margins no float32 difference can flip: target
"argmax_per_sample" is put to the test.

The artifacts go to $MULTISAL_LEGACY_REFERENCE (the Makefile sets out/legacy-reference) or, when
that is unset, to a temporary folder. meta.json is written last and removed first, so the main
tests never read a half-written or stale reference.
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path

import chainer
import chainer.functions as F
import numpy as np
import pytest
import skimage.data
from chainer.links import VGG16Layers
from chainer.variable import Variable
from PIL import Image

import multisal as ms
from helpers import agrees, assert_agree
from multisal.presets import RESAMPLE

WEIGHTS_SEED = 2         # the network's weights (test_the_reference_is_informative says what it gives)
SEED = 0                 # np.random.seed(SEED) before the write-up's loop = noise="legacy", seed=SEED
CONV1_OWN = 0.5          # conv1_1's filters: one shared filter plus this much of their own
RANDOM_PART = 0.1        # He-normal part of every later layer, beside its nonnegative average
FC8_STD = 0.0012         # logits of std ~1.3 (clean) to ~3 (noisy): softmax not saturated
FC8_BIAS_STD = 1.0
CASES = {                # name: (samples, noise level)
    "n1": (1, 0.0),      # one sample without noise: the write-up's last figure (plain gradient)
    "n10": (10, 0.2),    # ten noisy samples at the write-up's 20 %
}
PRESET = ms.get_preset("chainer-vgg16")
LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
          "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8")


def seeded_vgg16(seed=WEIGHTS_SEED):
    """VGG16Layers without downloading anything, then deterministic weights (see the module docstring)."""
    model = VGG16Layers(pretrained_model=None)
    rng = np.random.default_rng(seed)
    for name in LAYERS:
        link = getattr(model, name)
        W, b = link.W.array, link.b.array
        fan_in = int(np.prod(W.shape[1:]))
        he = np.float32(np.sqrt(2.0 / fan_in))
        b[...] = 0
        if name == "conv1_1":
            W[...] = rng.standard_normal(W.shape[1:], dtype=np.float32)     # the shared filter
            own = rng.standard_normal(W.shape, dtype=np.float32)
            own *= np.float32(CONV1_OWN)
            W += own
            W *= he
        elif name == "fc8":
            rng.standard_normal(dtype=np.float32, out=W)
            W *= np.float32(FC8_STD)
            rng.standard_normal(dtype=np.float32, out=b)
            b *= np.float32(FC8_BIAS_STD)
        else:
            rng.standard_normal(dtype=np.float32, out=W)
            np.abs(W, out=W)
            W *= np.float32(np.sqrt(np.pi / 2) / fan_in)
            part = rng.standard_normal(W.shape, dtype=np.float32)
            part *= np.float32(RANDOM_PART * np.sqrt(2.0 / fan_in))
            W += part
    return model


@contextmanager
def in_float64(model):
    """The model's parameters as float64 for a while (float32 -> float64 -> float32 is exact)."""
    for p in model.params():
        p.array = p.array.astype(np.float64)
    try:
        yield model
    finally:
        for p in model.params():
            p.array = p.array.astype(np.float32)


def writeup_smoothgrad(model, image, sampleSize, noiseLevel, seed):
    """The write-up's loop as it is written there (one sample at a time, forward to 'prob',
    softmax_cross_entropy(prob, argmax(prob)), loss.backward(), x.grad), after np.random.seed(seed).

    Returns (M, the per-sample gradients G, the per-sample labels, the per-sample probabilities).
    """
    sigma = noiseLevel * 255.0
    np.random.seed(seed)
    gradList, labels, probs = [], [], []
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", True):
        for _ in range(sampleSize):
            x = np.asarray(image, dtype=np.float32)
            # RGB to BGR
            x = x[:, :, ::-1]
            # subtract the mean
            x -= np.array([103.939, 116.779, 123.68], dtype=np.float32)
            x = x.transpose((2, 0, 1))
            x = x[np.newaxis]
            # add noise
            x += sigma * np.random.randn(x.shape[0], x.shape[1], x.shape[2], x.shape[3])
            x = Variable(np.asarray(x))
            # forward, take the last layer
            y = model(x, layers=['prob'])['prob']
            # backward from the top predicted label
            t = np.zeros((x.data.shape[0]), dtype=np.int32)
            t[:] = np.argmax(y.data)
            t = Variable(np.asarray(t))
            loss = F.softmax_cross_entropy(y, t)
            loss.backward()
            grad = np.copy(x.grad)
            gradList.append(grad)
            model.cleargrads()
            labels.append(int(t.array[0]))
            probs.append(np.copy(y.data[0]))
    G = np.array(gradList)
    M = np.mean(np.max(np.abs(G), axis=2), axis=0)
    M = np.squeeze(M)
    return M, G, labels, np.array(probs)


def artifacts_dir(tmp_path_factory):
    folder = os.environ.get("MULTISAL_LEGACY_REFERENCE")
    return Path(folder) if folder else tmp_path_factory.mktemp("legacy-reference")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = artifacts_dir(tmp_path_factory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)          # never leave a stale reference behind
    model = seeded_vgg16()
    photo = skimage.data.chelsea()
    # The write-up resizes a PIL image with image.resize((224, 224)); the filter is the preset's.
    image = Image.fromarray(photo).resize((224, 224), Image.Resampling[RESAMPLE[PRESET.resample]])
    cases = {}
    for name, (n, level) in CASES.items():
        M, G, labels, probs = writeup_smoothgrad(model, image, n, level, SEED)
        cases[name] = dict(n=n, noise_level=level, map=M, grads=G, labels=labels, probs=probs)
    return dict(out=out, model=model, photo=photo, image=image, cases=cases)


@pytest.fixture(scope="module")
def backend(reference):
    return ms.load_backend("chainer", model=reference["model"], preset="chainer-vgg16")


def _multisal_map(be, photo, n, level):
    x = PRESET.apply(photo)
    return ms.smoothgrad(be, x, target="argmax_per_sample", objective="chainer_prob_ce", n=n,
                         noise_level=level, noise="legacy", seed=SEED, channel_reduce="max")


def test_the_reference_is_informative(reference):
    """Seeded weights that make a meaningful test: softmax not saturated, gradients not zero, no
    near-tie a float32 difference between backends could flip, and a per-sample argmax that is not
    the clean photo's (so "argmax_per_sample" and the clean argmax give different maps)."""
    for case in reference["cases"].values():
        assert case["probs"].max() < 0.5
        assert all(np.abs(g).max() > 0 for g in case["grads"])
        logp = np.sort(np.log(case["probs"].astype(np.float64)), axis=1)
        assert (logp[:, -1] - logp[:, -2]).min() > 0.05      # top-2 margin
    clean, = reference["cases"]["n1"]["labels"]
    assert clean not in reference["cases"]["n10"]["labels"]


def test_float32_agrees_with_float64(reference):
    """The reason for the weights: the write-up's float32 map of the clean photo and the same map
    computed in float64 agree to DESIGN's bound (measured: relative L2 1e-4; with He-normal weights
    6e-3, 7% of the elements off), so two float32 frameworks can be held to it."""
    x = PRESET.apply(reference["photo"]).astype(np.float64)
    with in_float64(reference["model"]) as model, chainer.using_config("train", False):
        xv = Variable(x)
        prob = model(xv, layers=["prob"])["prob"]
        t = prob.array.argmax(axis=1).astype(np.int32)
        g, = chainer.grad([F.softmax_cross_entropy(prob, t)], [xv])
    c = reference["cases"]["n1"]
    assert t.tolist() == c["labels"]
    assert_agree(c["map"], np.abs(g.array).max(axis=1)[0])


def test_preset_is_the_writeups_preprocessing(reference):
    x = np.asarray(reference["image"], dtype=np.float32)[:, :, ::-1]
    x = (x - np.array([103.939, 116.779, 123.68], dtype=np.float32)).transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(PRESET.apply(reference["photo"]), x)
    assert PRESET.value_range[1] - PRESET.value_range[0] == pytest.approx(255.0)   # noise_level 0.2 -> sigma 51


def test_vgg16layers_output_and_default_layer(backend):
    assert backend.output_name == "fc8"
    assert backend.default_layer((3, 224, 224)) == "pool5"


@pytest.mark.parametrize("case", list(CASES))
def test_multisal_chainer_backend_reproduces_the_writeup(reference, backend, case):
    c = reference["cases"][case]
    ours = _multisal_map(backend, reference["photo"], c["n"], c["noise_level"])
    assert ours.shape == (1, 224, 224)
    assert_agree(ours[0], c["map"])
    c["multisal"] = ours


def test_reduction_order(reference, backend):
    """The write-up takes the mean over samples of the channel maximum; the channel maximum of the
    mean gradient is a different map, and ms.smoothgrad(channel_reduce='max') is the former."""
    c = reference["cases"]["n10"]
    G = c["grads"][:, 0]                                  # (samples, C, H, W)
    mean_of_max = np.abs(G).max(axis=1).mean(axis=0)
    max_of_mean = np.abs(G.mean(axis=0)).max(axis=0)
    np.testing.assert_array_equal(mean_of_max, c["map"])
    assert not agrees(max_of_mean, mean_of_max, tol=0.1)         # 35% relative L2 apart
    ours = c.get("multisal")
    if ours is None:
        ours = _multisal_map(backend, reference["photo"], c["n"], c["noise_level"])
    assert_agree(ours[0], mean_of_max)
    assert not agrees(ours[0], max_of_mean, tol=0.1)


def _holds(path, model):
    """Does the .npz at path hold exactly this model's parameters?"""
    if not path.is_file():
        return False
    params = {name.lstrip("/"): p.array for name, p in model.namedparams()}
    try:
        with np.load(path) as npz:
            return set(npz.files) == set(params) and all(np.array_equal(npz[k], v) for k, v in params.items())
    except Exception:
        return False


def test_save_artifacts(reference, backend):
    """Everything the main environment needs, meta.json last."""
    out = reference["out"]
    weights = out / "vgg16_seeded.npz"
    if not _holds(weights, reference["model"]):
        # Rewritten only when the weights change: the main tests cache the ONNX export by the
        # file's bytes, and a zip archive's bytes change with its timestamps.
        chainer.serializers.save_npz(str(weights), reference["model"], compression=False)
    Image.fromarray(reference["photo"]).save(out / "photo.png")
    np.save(out / "input.npy", PRESET.apply(reference["photo"]))
    meta = dict(
        weights="vgg16_seeded.npz", photo="photo.png", input="input.npy", seed=SEED, weights_seed=WEIGHTS_SEED,
        preset="chainer-vgg16", resample=PRESET.resample, objective="chainer_prob_ce", target="argmax_per_sample",
        noise="legacy", channel_reduce="max", output_layer=backend.output_name,
        default_layer=backend.default_layer((3, 224, 224)),
        chainer=chainer.__version__, numpy=np.__version__, cases={})
    for name, c in reference["cases"].items():
        np.save(out / f"map_{name}.npy", c["map"].astype(np.float32))
        np.save(out / f"grads_{name}.npy", c["grads"][:, 0].astype(np.float32))
        np.save(out / f"probs_{name}.npy", c["probs"].astype(np.float32))
        meta["cases"][name] = dict(n=c["n"], noise_level=c["noise_level"], map=f"map_{name}.npy",
                                   grads=f"grads_{name}.npy", probs=f"probs_{name}.npy", labels=c["labels"],
                                   max_prob=float(c["probs"].max()))
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    assert json.loads((out / "meta.json").read_text())["cases"]["n10"]["n"] == 10
