"""Bad arguments to the Python API: every one raises MultisalError (or a subclass), whose text is
one line naming the argument and what was expected, never a framework's exception from deep
inside (README, "Errors"). Upper bounds (n, steps, iterations, size) are part of it: a typo of
10**9 would otherwise run for days.

All on the tiny classifier at 32x32 (tests/tiny_models.py).
"""
import os

import numpy as np
import pytest

import multisal as ms
import tiny_models
from multisal.images import load_rgb


@pytest.fixture(scope="module")
def be():
    return ms.load_backend({"model": "tiny_models:classifier", "preset": "raw", "size": [32, 32]})


@pytest.fixture(scope="module")
def x(be):
    rng = np.random.default_rng(0)
    return be.preset.apply([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)])


def refused(call, *names, kind=ms.MultisalError):
    """call() raises `kind` with one line that names each of `names`; returns the line."""
    with pytest.raises(kind) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and text.strip() == text and text, repr(text)
    for name in names:
        assert name in text, (name, text)
    return text


# ---- inputs ---------------------------------------------------------------------------------------
def test_a_list_given_as_inputs(be, x):
    refused(lambda: ms.gradcam(be, x.tolist()), "inputs must be a numpy array", "got list")
    refused(lambda: ms.vanilla_gradient(be, list(x)), "inputs must be a numpy array")


def test_a_wrong_channel_count_to_the_torch_backend(be, x):
    grey = x[:, :1]
    # the backend sizes its batch on one sample first, so that is the shape the line names
    refused(lambda: ms.vanilla_gradient(be, grey), "Sequential failed on inputs of shape (1, 1, 32, 32)",
            "to have 3 channels, but got 1")
    refused(lambda: ms.gradcam(be, grey), "1, 32, 32)", "3 channels")


def test_inputs_of_the_wrong_shape_type_or_values(be, x):
    refused(lambda: ms.vanilla_gradient(be, x[0]), "inputs must have shape (N,C,H,W)", "(3, 32, 32)")
    refused(lambda: ms.vanilla_gradient(be, x.astype(np.int32)), "inputs must be float32", "int32")
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    refused(lambda: ms.smoothgrad(be, nan, n=2), "NaN or infinite")


def test_an_empty_batch(be, x):
    for method in (ms.smoothgrad, ms.vanilla_gradient, ms.integrated_gradients, ms.gradcam, ms.gradcam_pp,
                   ms.smooth_gradcam_pp):
        refused(lambda: method(be, x[:0]), "inputs hold no image", "(0, ...)")


# ---- sample counts, seeds, bounds ---------------------------------------------------------------------
@pytest.mark.parametrize("n, names", [
    (None, ["n=None", "must be an integer"]),
    (float("nan"), ["n=nan", "must be an integer"]),
    (2.5, ["n=2.5"]),
    (True, ["n=True"]),
    (10 ** 9, ["n=1000000000", "1..100000"]),
    ("many", ["n='many'", "'auto'"]),
])
def test_smoothgrad_sample_counts(be, x, n, names):
    refused(lambda: ms.smoothgrad(be, x, n=n), *names)
    refused(lambda: ms.smooth_gradcam_pp(be, x, n=n), *names)
    refused(lambda: ms.smooth(ms.vanilla_gradient, be, x, n=n), *names)


def test_zero_samples(be, x):
    # smooth_gradcam_pp documents n=0 (the clean input's derivatives); an average of none is nothing
    refused(lambda: ms.smoothgrad(be, x, n=0), "n=0", "1..100000")
    refused(lambda: ms.smooth(ms.gradcam, be, x, n=0), "n=0", "1..100000")
    assert ms.smooth_gradcam_pp(be, x, n=0).shape == (2, 32, 32)


def test_auto_sample_counts_are_bounded(be, x):
    refused(lambda: ms.smoothgrad(be, x, n="auto", max_n=10 ** 9), "n=1000000000", "1..100000")


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_seeds(be, x, seed):
    refused(lambda: ms.smoothgrad(be, x, n=2, seed=seed), f"seed={seed!r}", "an integer >= 0")
    refused(lambda: ms.smoothgrad(be, x, n=2, seed=2 ** 32, noise="legacy"), "below 2**32")


@pytest.mark.parametrize("options, names", [
    ({"noise_level": -0.1}, ["noise_level=-0.1", ">= 0"]),
    ({"noise_level": float("nan")}, ["noise_level=nan"]),
    ({"noise_level": "high"}, ["noise_level='high'"]),
    ({"sigma": -1.0}, ["sigma=-1.0", ">= 0"]),
    ({"sigma": "wide"}, ["sigma='wide'"]),
    ({"sigma": 0.1, "noise_level": 0.2}, ["give sigma or noise_level, not both"]),
    ({"noise": "pink"}, ["unknown noise 'pink'"]),
    ({"noise": np.zeros((2, 1, 32, 32), np.float32)}, ["noise array has shape (2, 1, 32, 32)"]),
    ({"batch_size": "eight"}, ["batch_size='eight'", "1..4096"]),
    ({"batch_size": -3}, ["batch_size=-3"]),
    ({"batch_size": 0}, ["batch_size=0"]),
    ({"batch_size": 10 ** 6}, ["batch_size=1000000", "1..4096"]),
])
def test_noise_options(be, x, options, names):
    refused(lambda: ms.smoothgrad(be, x, n=2, **options), *names)
    refused(lambda: ms.smooth_gradcam_pp(be, x, n=2, **options), *names)


def test_integrated_gradients_steps_and_baselines(be, x):
    for steps in (0, -1, 10 ** 6, 2.0, None):
        refused(lambda: ms.integrated_gradients(be, x, steps=steps), f"steps={steps!r}", "1..100000")
    refused(lambda: ms.integrated_gradients(be, x, baseline=np.zeros((3, 16, 16), np.float32)),
            "baseline of shape (3, 16, 16)", "(2, 3, 32, 32)")
    refused(lambda: ms.integrated_gradients(be, x, baseline=[np.nan]), "baseline contains NaN")
    refused(lambda: ms.integrated_gradients(be, x, method="simpson"), "unknown integration method 'simpson'")
    refused(lambda: ms.integrated_gradients(be, x, steps=1, method="riemann_trapezoid"), "steps >= 2")
    refused(lambda: ms.integrated_gradients(be, x, batch_size="all"), "batch_size='all'")


def test_iterations_are_bounded(be, x):
    refused(lambda: ms.class_visualization(be, 0, size=(32, 32), iterations=10 ** 6), "iterations=1000000",
            "0..100000")
    refused(lambda: ms.class_visualization(be, 0, size=(9000, 9000), iterations=1), "size (9000, 9000)", "1..8192")
    refused(lambda: ms.fooling_image(be, x, 1, max_iter=10 ** 6), "max_iter=1000000", "0..100000")
    photo = be.preset.invert(x[0])
    saliency = ms.vanilla_gradient(be, x)[0]
    refused(lambda: ms.segment(photo, saliency, iterations=10 ** 9), "iterations=1000000000")
    refused(lambda: ms.segment(photo, saliency, iterations=-1), "iterations=-1")


def test_image_sizes_are_bounded(be):
    refused(lambda: be.preset.apply(np.zeros((8, 8, 3), np.uint8), size=(9000, 9000)), "size (9000, 9000)",
            "1..8192")
    refused(lambda: ms.get_preset("raw", size=(0, 32)), "size (0, 32)")


# ---- targets, layers, neurons, filters --------------------------------------------------------------
def test_targets(be, x):
    refused(lambda: ms.vanilla_gradient(be, x, target=[0, 1, 2]), "target has 3 entries for 2 images")
    refused(lambda: ms.vanilla_gradient(be, x, target=np.array([0, 1, 2])), "3 entries for 2 images")
    refused(lambda: ms.gradcam(be, x, target=[[0], [1]]), "target")
    refused(lambda: ms.vanilla_gradient(be, x, target=-1), "negative class index")
    refused(lambda: ms.vanilla_gradient(be, x, target=99), "target 99 out of range", "5 classes")
    refused(lambda: ms.smoothgrad(be, x, n=2, target="cat"), "unknown target 'cat'")
    refused(lambda: ms.vanilla_gradient(be, x, target=1.5), "target")


def test_layers_filters_and_neurons(be, x):
    refused(lambda: ms.gradcam(be, x, layer="nope"), "unknown layer 'nope'")
    refused(lambda: ms.gradcam(be, x, layer="5"), "layer '5'", "4-D")
    refused(lambda: ms.smooth_gradcam_pp(be, x, n=2, filters=[]), "filters=[]")
    refused(lambda: ms.smooth_gradcam_pp(be, x, n=2, filters=[99]), "filter 99 out of range", "6 feature maps")
    for neuron in ((1.5, 2), (1,), "ab", None, (1, 2, 3)):
        refused(lambda: ms.smooth_gradcam_pp(be, x, n=2, neurons=[neuron]), f"neuron {neuron!r}",
                "(row, col) pair of integers")
    refused(lambda: ms.smooth_gradcam_pp(be, x, n=2, neurons=[(99, 0)]), "neuron (99, 0) is outside")
    refused(lambda: ms.smooth_gradcam_pp(be, x, n=2, neurons=[(0, 0)], region=True), "region=True needs two")


def test_objectives_and_channel_reductions(be, x):
    refused(lambda: ms.vanilla_gradient(be, x, objective="loss"), "unknown objective 'loss'")
    refused(lambda: ms.vanilla_gradient(be, x, channel_reduce="median"), "unknown channel_reduce 'median'")
    refused(lambda: ms.gradcam(be, x, objective="loss"), "unknown objective 'loss'")


# ---- segmentation -----------------------------------------------------------------------------------------
def test_segment_on_maps_it_cannot_use(be, x):
    photo = be.preset.invert(x[0])
    refused(lambda: ms.segment(photo, np.ones((32, 32))), "constant saliency map")
    refused(lambda: ms.segment(photo, np.full((32, 32), np.nan)), "NaN or infinite")
    refused(lambda: ms.segment(photo, np.zeros((2, 32, 32))), "2-D saliency map")
    refused(lambda: ms.segment(photo.astype(np.float32), np.eye(32)), "HWC uint8 RGB")
    refused(lambda: ms.segment(photo, np.eye(32), threshold=0.2, background=0.5), "background (0.5) < threshold")
    refused(lambda: ms.segment(photo, np.eye(32), threshold="high"), "threshold (high)")
    refused(lambda: ms.segment(photo, np.eye(32), background=float("nan")), "background (nan)")


# ---- backends and configurations ---------------------------------------------------------------------------
def test_load_backend_arguments():
    net = tiny_models.classifier()
    refused(lambda: ms.load_backend("torch", model=net, colour="red"), "unknown option 'colour'", "device")
    refused(lambda: ms.load_backend("torch", model=net, device="meta"), "device 'meta'")
    refused(lambda: ms.load_backend("torch", model=net, memory_budget="lots"), "memory_budget 'lots'")
    refused(lambda: ms.load_backend("torch", model=42), "needs a torch.nn.Module, got int")
    refused(lambda: ms.load_backend("tensorflow", model=net), "unknown backend 'tensorflow'")
    refused(lambda: ms.load_backend({"model": "tiny_models:classifier", "colour": 1}), "config key 'colour'",
            kind=ms.ConfigError)
    refused(lambda: ms.load_backend({"model": "tiny_models:classifier", "preset": "raw"}, device="cpu"),
            "takes no other arguments")


def test_onnx_backend_arguments(tmp_path):
    pytest.importorskip("onnxruntime")
    from hostile import onnx_classifier
    model = onnx_classifier()
    refused(lambda: ms.load_backend("onnx", model=model, providers=[]), "providers=[]")
    refused(lambda: ms.load_backend("onnx", model=model, providers="CPUExecutionProvider"), "providers=")
    refused(lambda: ms.load_backend("onnx", model=str(tmp_path / "none.onnx")), "not found")
    refused(lambda: ms.load_backend("onnx", model=12), "needs a path to an .onnx file or an onnx.ModelProto")


def test_images_the_api_is_given(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    refused(lambda: load_rgb(str(fifo)), "not a regular file")
    refused(lambda: load_rgb(b"%!PS\n{ } loop\n"), "cannot read image '<bytes>'", "cannot identify image file")
    refused(lambda: load_rgb(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n{ } loop\n", name="eps.png"),
            "cannot read image 'eps.png'", "cannot identify image file")
    refused(lambda: load_rgb(np.zeros((4, 4, 3), np.float32)), "uint8", "float32")
    refused(lambda: load_rgb(np.zeros((4, 4, 5), np.uint8)), "(4, 4, 5)")
    refused(lambda: load_rgb(3.0), "cannot use float as an image")


def test_runs_refuse_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = {"model": "tiny_models:classifier", "preset": "raw", "size": [32, 32], "inputs": ["skimage:coffee"],
              "output": str(blocker)}
    refused(lambda: ms.run_explain(config), f"output folder {str(blocker)!r} is a file")
    refused(lambda: ms.run_batch(dict(config, smoothgrad={"n": 10 ** 7})), "config key 'smoothgrad.n'",
            kind=ms.ConfigError)
    refused(lambda: ms.run_batch(42), "a dict or the path of a TOML file", kind=ms.ConfigError)
