"""The Chainer SmoothGrad write-up, reproduced by the torch and ONNX backends.

The legacy environment runs the write-up's own loop in Chainer 7.8.1 on a VGG16Layers with seeded
weights (tests/legacy/test_chainer_reference.py) and saves the weights, the photo, the model input,
the per-sample probabilities and gradients and the maps into $MULTISAL_LEGACY_REFERENCE (the
Makefile sets out/legacy-reference). Here the same weights go into models.load("vgg16-chainer")
(torch) and its ONNX export, and multisal with the chainer-vgg16 preset, objective
chainer_prob_ce, target "argmax_per_sample" and noise "legacy" must give the same maps, in
DESIGN.md's sense: relative L2 error at most 1e-3, at most 0.1% of the elements off by more than
1e-3 of the largest.

That bound holds because of how the reference weights are built (see the legacy test's docstring):
float32 rounding still flips a few of VGG16's ReLU and max-pool decisions on every sample, but
with these weights the gradient adds up coherently and a flip moves it by at most a few 1e-4 (with
He-normal weights: up to 9e-3, and the maps agreed only to 8e-3). Measured against Chainer, torch
and ONNX: relative L2 1.3e-4 and 1.0e-4 for the one-sample map, 8e-5 and 2e-5 for the ten-sample
map, no element off by more than 1e-3 of the largest. Every wrong ingredient misses by far: the
clean photo's argmax instead of the per-sample one (81% relative L2), the channel maximum of the
mean gradient (35%), seed 1 (27%), noise level 0.15 (19%), one sample fewer (6%, and 87% of the
elements off by more than 1e-3 of the largest).

(The write-up's objective, softmax_cross_entropy applied to the softmax output, differs from the
plain "softmax" objective only by a factor 1 - softmax(prob)_t >= 0.997 and terms of order 1/1000:
no map comparison can tell them apart; tests/legacy checks the objective in closed form.)
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import multisal as ms
from helpers import agrees, assert_agree
from multisal import models
from multisal.backends.onnx.model import exported_model
from multisal.noise import NoiseStream

ENV = "MULTISAL_LEGACY_REFERENCE"


def _reference_dir() -> Path:
    folder = os.environ.get(ENV)
    if not folder:
        pytest.skip(f"{ENV} is not set: run the legacy tests first (make test does both, "
                    f"with {ENV}=out/legacy-reference)")
    path = Path(folder)
    if not (path / "meta.json").is_file():
        pytest.fail(f"{ENV}={folder} but {path / 'meta.json'} is missing: the legacy tests "
                    "(.venv-legacy/bin/python -m pytest tests/legacy) did not write the Chainer reference")
    return path


@pytest.fixture(scope="module")
def reference():
    path = _reference_dir()
    meta = json.loads((path / "meta.json").read_text())
    pre = ms.get_preset(meta["preset"], resample=meta["resample"])
    photo = np.asarray(Image.open(path / meta["photo"]).convert("RGB"))
    cases = {}
    for name, c in meta["cases"].items():
        cases[name] = dict(c, map=np.load(path / c["map"]), grads=np.load(path / c["grads"]),
                           probs=np.load(path / c["probs"]))
    return dict(path=path, meta=meta, preset=pre, photo=photo, x=np.load(path / meta["input"]), cases=cases)


@pytest.fixture(scope="module")
def torch_backend(reference):
    net = models.load("vgg16-chainer", weights=str(reference["path"] / reference["meta"]["weights"]))
    return ms.load_backend("torch", model=net, device="cpu", preset=reference["preset"])


@pytest.fixture(scope="module")
def onnx_backend(reference, tmp_path_factory):
    # The export (500 MB) is cached next to the weights it comes from; the gradient graphs are built
    # afresh (their rules are multisal's own code) in a temporary folder.
    path = exported_model("vgg16-chainer", weights=str(reference["path"] / reference["meta"]["weights"]),
                              cache_dir=reference["path"] / "onnx")
    for stale in path.parent.glob("vgg16-chainer-*.onnx"):    # exports of earlier weights files
        if stale != path:
            stale.unlink()
    return ms.load_backend("onnx", model=str(path), providers=["CPUExecutionProvider"], preset=reference["preset"],
                           cache_dir=tmp_path_factory.mktemp("vgg16-grad-graphs"))


@pytest.fixture(params=["torch", "onnx"])
def backend(request):
    return request.getfixturevalue(f"{request.param}_backend")


def _smoothgrad(be, ref, case, **change):
    """The write-up's map of one case, with the reference's settings (or some changed)."""
    meta, c = ref["meta"], ref["cases"][case]
    options = dict(target=meta["target"], objective=meta["objective"], n=c["n"], noise_level=c["noise_level"],
                   noise=meta["noise"], seed=meta["seed"], channel_reduce=meta["channel_reduce"])
    return ms.smoothgrad(be, ref["x"], **{**options, **change})[0]


def test_reference_is_present():
    """With MULTISAL_LEGACY_REFERENCE set (make test), a missing reference is a failure, not a skip."""
    meta = json.loads((_reference_dir() / "meta.json").read_text())
    assert set(meta["cases"]) == {"n1", "n10"} and meta["default_layer"] == "pool5"


def test_preprocessing_is_the_chainer_input(reference):
    np.testing.assert_array_equal(reference["preset"].apply(reference["photo"]), reference["x"])


@pytest.mark.parametrize("case", ["n1", "n10"])
def test_forward_pass_and_labels_per_noisy_sample(reference, backend, case):
    """multisal's legacy noise stream gives Chainer's noisy inputs: same softmax, same argmax."""
    meta, c = reference["meta"], reference["cases"][case]
    sigma = c["noise_level"] * (reference["preset"].value_range[1] - reference["preset"].value_range[0])
    noisy = NoiseStream(meta["noise"], reference["x"], c["n"], sigma, meta["seed"]).take(0, c["n"])
    logits = backend.predict(noisy).astype(np.float64)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    assert_agree(prob, c["probs"])
    assert logits.argmax(1).tolist() == c["labels"]


@pytest.mark.parametrize("case", ["n1", "n10"])
def test_maps_reproduce_the_chainer_writeup(reference, backend, case):
    ours = _smoothgrad(backend, reference, case)
    assert ours.shape == reference["cases"][case]["map"].shape == (224, 224)
    assert_agree(ours, reference["cases"][case]["map"])
    reference["cases"][case].setdefault("ours", {})[backend.name] = ours


def test_reduction_order_and_target(reference, torch_backend):
    """Mean over samples of the channel maximum (the write-up, multisal's channel_reduce='max')
    is not the channel maximum of the mean gradient, on Chainer's own per-sample gradients; and
    the noisy samples' own argmax is not the clean photo's."""
    c = reference["cases"]["n10"]
    G = c["grads"]
    mean_of_max = np.abs(G).max(axis=1).mean(axis=0)
    max_of_mean = np.abs(G.mean(axis=0)).max(axis=0)
    np.testing.assert_allclose(mean_of_max, c["map"], rtol=1e-6, atol=0)
    assert not agrees(max_of_mean, mean_of_max, tol=0.1)        # 35% relative L2 apart
    ours = c.get("ours", {}).get("torch")
    if ours is None:
        ours = _smoothgrad(torch_backend, reference, "n10")
    assert_agree(ours, mean_of_max)
    assert not agrees(ours, max_of_mean, tol=0.1)
    clean_argmax = _smoothgrad(torch_backend, reference, "n10", target=None)
    assert not agrees(clean_argmax, c["map"], tol=0.1)            # 81% relative L2 apart


def test_default_layer_is_chainers(reference, torch_backend, onnx_backend):
    """DESIGN's rule gives Chainer's pool5 on every backend (the last 4-D activation with spatial size > 1)."""
    shape = reference["x"].shape[1:]
    layer = torch_backend.default_layer(shape)
    assert layer == reference["meta"]["default_layer"] == "pool5"
    lo = onnx_backend.default_layer(shape)
    a_torch = torch_backend.run(reference["x"], layers=[layer]).activations[layer]
    a_onnx = onnx_backend.run(reference["x"], layers=[lo]).activations[lo]
    assert a_torch.shape == a_onnx.shape == (1, 512, 7, 7)
    assert_agree(a_onnx, a_torch)


def _script():
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_chainer_smoothgrad.py"
    spec = importlib.util.spec_from_file_location("reproduce_chainer_smoothgrad", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduction_script_checkpoints(reference, torch_backend):
    """The script's one pass over the samples gives, at every checkpoint, the write-up's map over
    that many samples (computed here from Chainer's own per-sample gradients)."""
    script = _script()
    meta, c = reference["meta"], reference["cases"]["n10"]
    sigma = c["noise_level"] * 255.0
    maps = script.checkpoint_maps(torch_backend, reference["x"], 10, sigma, meta["seed"], progress=False)
    assert list(maps) == [1, 2, 3, 10]
    for k, m in maps.items():
        assert_agree(m, np.abs(c["grads"][:k]).max(axis=1).mean(axis=0))
    # The one-sample map is not the ten-sample one: the checkpoints are running means, not totals.
    assert not agrees(maps[1], maps[10], tol=0.1)


def test_reproduction_script_help_names_the_weights():
    import subprocess
    import sys
    path = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_chainer_smoothgrad.py"
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, check=True).stdout
    assert "VGG_ILSVRC_16_layers.caffemodel" in out and ".chainer/dataset/pfnet/chainer/models" in out
    for option in ("--weights", "--backend", "--out", "--samples", "--seed", "--resample"):
        assert option in out
