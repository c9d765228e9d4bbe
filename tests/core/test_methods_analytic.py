"""The methods on analytic NumPy models (tests/numpy_backend.py), with no framework: tiny networks
whose maps are known in closed form, in the manner of PAIR saliency's gradients_test.py. Every
expected value is computed here from the weights, or from the paper's formula written out."""
import numpy as np
import pytest

import multisal as ms
import numpy_backend as nb
from helpers import assert_agree

SHAPE = (3, 4, 4)


@pytest.fixture
def x():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, *SHAPE)) + 1.5 * rng.standard_normal((2, 3, 1, 1))).astype(np.float32)


def _linear():
    net = nb.linear(SHAPE)
    weights, bias = net.params()["fc.weight"], net.params()["fc.bias"]
    return nb.NumpyBackend(net, float64=True), weights, bias


def _softmax(s):
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---- y = W x + b: gradients are rows of W --------------------------------------------------------
def test_vanilla_gradient_of_a_linear_model_is_the_weight_row(x):
    be, W, b = _linear()
    t = np.array([1, 4])
    rows = W[t].reshape(len(t), *SHAPE)
    np.testing.assert_allclose(ms.vanilla_gradient(be, x, t, channel_reduce=None, abs=False), rows, rtol=1e-12)
    np.testing.assert_allclose(ms.vanilla_gradient(be, x, t), np.abs(rows).max(axis=1), rtol=1e-12)
    # softmax: p_c (W_c - sum_j p_j W_j); log_softmax: W_c - sum_j p_j W_j.
    p = _softmax(x.reshape(2, -1).astype(np.float64) @ W.T + b)
    mixed = (p @ W).reshape(len(t), *SHAPE)
    np.testing.assert_allclose(ms.vanilla_gradient(be, x, t, objective="log_softmax", channel_reduce=None, abs=False),
                               rows - mixed, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ms.vanilla_gradient(be, x, t, objective="softmax", channel_reduce=None, abs=False),
                               p[[0, 1], t][:, None, None, None] * (rows - mixed), rtol=1e-9, atol=1e-12)


def test_smoothgrad_of_a_linear_model_is_the_vanilla_gradient(x):
    be, W, _ = _linear()
    t = np.array([2, 0])
    rows = W[t].reshape(len(t), *SHAPE)
    np.testing.assert_allclose(ms.smoothgrad(be, x, t, n=5, noise_level=0.3, channel_reduce=None, abs=False), rows,
                               rtol=1e-6)
    np.testing.assert_allclose(ms.smoothgrad(be, x, t, n=5, noise="legacy"), np.abs(rows).max(axis=1), rtol=1e-6)


@pytest.mark.parametrize("method, steps", [("riemann_right", 3), ("riemann_trapezoid", 2), ("gausslegendre", 4)])
def test_integrated_gradients_of_a_linear_model(x, method, steps):
    be, W, b = _linear()
    t = np.array([3, 1])
    rows = W[t].reshape(len(t), *SHAPE)
    for baseline in (None, 0.5):
        base = np.zeros_like(x) if baseline is None else np.full_like(x, baseline)
        ig = ms.integrated_gradients(be, x, t, baseline=baseline, steps=steps, method=method)
        np.testing.assert_allclose(ig, (x - base) * rows, rtol=1e-5, atol=1e-7)
        # Completeness: the attributions add up to the score's change along the path.
        score = (x.reshape(2, -1).astype(np.float64) @ W.T + b)[[0, 1], t]
        score_base = (base.reshape(2, -1).astype(np.float64) @ W.T + b)[[0, 1], t]
        np.testing.assert_allclose(ig.sum(axis=(1, 2, 3)), score - score_base, rtol=1e-5)


def test_integrated_gradients_completeness_on_a_smooth_objective(x):
    """softmax of a linear model is not linear in x, but smooth: Gauss-Legendre with 24 nodes
    integrates its path to float32 accuracy, so the attributions add up to p_c(x) - p_c(0)."""
    be, W, b = _linear()
    t = np.array([0, 2])
    ig = ms.integrated_gradients(be, x, t, steps=24, method="gausslegendre", objective="softmax")
    p = _softmax(x.reshape(2, -1).astype(np.float64) @ W.T + b)[[0, 1], t]
    p0 = _softmax(np.broadcast_to(b, (2, len(b))))[[0, 1], t]
    np.testing.assert_allclose(ig.sum(axis=(1, 2, 3)), p - p0, rtol=1e-4)


# ---- conv -> global average pool -> linear: the layer gradient is W[c, k] / (h w) ------------------
def _conv(x, weight, bias):
    """A 3x3 convolution with zero padding 1, written as loops (independent of the backend's)."""
    n, _, h, w = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.empty((n, len(weight), h, w))
    for k in range(len(weight)):
        for i in range(h):
            for j in range(w):
                out[:, k, i, j] = (padded[:, :, i:i + 3, j:j + 3] * weight[k]).sum(axis=(1, 2, 3)) + bias[k]
    return out


def _cam_model(x):
    net = nb.conv_gap_linear(channels=SHAPE[0])
    params = net.params()
    A = _conv(x, params["conv.weight"], params["conv.bias"])
    return nb.NumpyBackend(net, float64=True), A, params["fc.weight"]


def test_gradcam_of_conv_gap_linear(x):
    be, A, W = _cam_model(x)
    t = np.array([2, 1])
    h, w = A.shape[2:]
    expected = np.maximum(np.einsum("nk,nkhw->nhw", W[t] / (h * w), A), 0)
    cam = ms.gradcam(be, x, t, layer="conv", upsample=False, normalize=False)
    assert_agree(cam, expected, tol=1e-5)


def test_gradcam_pp_of_conv_gap_linear(x):
    """The paper's alpha for a gradient g constant over the map, g_k = W[c, k] / (h w):
    alpha_k = g_k^2 / (2 g_k^2 + sum_ab A_kab g_k^3), w_k = sum_ij alpha_k relu(g_k)."""
    be, A, W = _cam_model(x)
    t = np.array([0, 2])
    h, w = A.shape[2:]
    g = W[t] / (h * w)
    alpha = g ** 2 / (2 * g ** 2 + A.sum(axis=(2, 3)) * g ** 3)
    weights = h * w * alpha * np.maximum(g, 0)
    expected = np.maximum(np.einsum("nk,nkhw->nhw", weights, A), 0)
    cam = ms.gradcam_pp(be, x, t, layer="conv", upsample=False, normalize=False)
    assert_agree(cam, expected, tol=1e-5)


def test_gradcam_pp_alpha_on_a_gradient_that_varies_over_the_map(x):
    """Grad-CAM++ on a layer with two ReLUs above it, from the layer's A and g: the paper's equation
    (19) element by element, with alpha = 0 where its denominator vanishes."""
    be = nb.NumpyBackend(nb.classifier(), float64=True)
    t = np.array([1, 3])
    res = be.run(x, "logit", t, layers=["conv1"])
    A, g = res.activations["conv1"], res.gradients["conv1"]
    n, k = A.shape[:2]
    weights = np.zeros((n, k))
    for i in range(n):
        for c in range(k):
            total = A[i, c].sum()
            for r, s in np.ndindex(A.shape[2:]):
                d1 = g[i, c, r, s]
                denominator = 2 * d1 ** 2 + total * d1 ** 3
                if d1 != 0 and denominator != 0:
                    weights[i, c] += d1 ** 2 / denominator * max(d1, 0)
    expected = np.maximum(np.einsum("nk,nkhw->nhw", weights, A), 0)
    assert np.count_nonzero(g == 0) > 0 and np.ptp(g) > 0   # the gradient varies, and is zero where ReLUs cut it
    assert_agree(ms.gradcam_pp(be, x, t, layer="conv1", upsample=False, normalize=False), expected, tol=1e-5)


# ---- the noise driver ----------------------------------------------------------------------------
def test_smooth_is_the_mean_of_the_methods_maps_over_the_noise_given(x):
    be = nb.NumpyBackend(nb.classifier(), float64=True)
    t = np.array([0, 2])
    noise = np.random.default_rng(5).standard_normal((3, *SHAPE)).astype(np.float32) * 0.4
    for method, options in ((ms.gradcam, dict(layer="relu1", upsample=False, normalize=False)),
                            (ms.integrated_gradients, dict(steps=3))):
        expected = np.mean([method(be, x + e, t, **options) for e in noise], axis=0)
        np.testing.assert_allclose(ms.smooth(method, be, x, noise=noise, target=t, **options), expected,
                                   rtol=1e-5, atol=1e-7)
    # One noise per image: image i gets noise[i, j] in sample j.
    per_image = np.stack([noise, noise[::-1]])
    expected = np.stack([np.mean([ms.vanilla_gradient(be, x[i:i + 1] + e, t[i:i + 1])[0] for e in per_image[i]], axis=0)
                         for i in range(2)])
    np.testing.assert_allclose(ms.smooth(ms.vanilla_gradient, be, x, noise=per_image, target=t), expected, rtol=1e-6)


def test_smooth_of_the_vanilla_gradient_is_smoothgrad(x):
    be = nb.NumpyBackend(nb.classifier(), float64=True)
    for target in (None, ms.ARGMAX_PER_SAMPLE):
        np.testing.assert_allclose(ms.smooth(ms.vanilla_gradient, be, x, n=6, noise_level=0.4, seed=3, target=target),
                                   ms.smoothgrad(be, x, target, n=6, noise_level=0.4, seed=3), rtol=1e-6)


def test_legacy_noise_is_numpys_global_seed_then_randn_per_sample(x):
    """What the Chainer write-up does per image: np.random.seed(seed), then for each sample
    x + sigma * np.random.randn(1, C, H, W) in float64, cast to float32. The softmax objective's
    gradient moves with every draw (a logit's is constant between ReLU kinks)."""
    be = nb.NumpyBackend(nb.classifier(), float64=True)
    sigma, seed, n = 0.7, 11, 4
    state = np.random.get_state()
    try:
        expected = []
        for i in range(len(x)):
            np.random.seed(seed)
            noisy = [(x[i:i + 1].astype(np.float64) + sigma * np.random.randn(1, *SHAPE)).astype(np.float32)
                     for _ in range(n)]
            expected.append(np.mean([ms.vanilla_gradient(be, v, 4, objective="softmax")[0] for v in noisy], axis=0))
    finally:
        np.random.set_state(state)
    got = ms.smoothgrad(be, x, 4, objective="softmax", n=n, sigma=sigma, noise="legacy", seed=seed, batch_size=3)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-6)


def test_without_a_preset_each_image_gets_noise_relative_to_its_own_range():
    """The SmoothGrad paper's noise level is relative to x_max - x_min of the image: two images of
    different contrast get their own sigma, so an image's map does not depend on the images beside
    it (with one batch-wide range the low-contrast image got the other's noise)."""
    be = nb.NumpyBackend(nb.classifier(), float64=True)
    assert be.preset is None
    rng = np.random.default_rng(3)
    x = np.stack([rng.standard_normal(SHAPE), 10 * rng.standard_normal(SHAPE)]).astype(np.float32)
    both = ms.smoothgrad(be, x, target=[0, 0], n=6, noise_level=0.2)
    for i in range(2):
        np.testing.assert_allclose(both[i], ms.smoothgrad(be, x[i:i + 1], target=[0], n=6, noise_level=0.2)[0],
                                   rtol=1e-6)
    # The noise itself: sigma_i = 0.2 * (max - min) of image i, drawn from image i's own stream.
    draws = np.random.Generator(np.random.PCG64(0)).standard_normal((6, *SHAPE), dtype=np.float32)
    sigma = 0.2 * (x[1].max() - x[1].min())
    expected = ms.smoothgrad(be, x[1:], target=[0], n=6, noise=draws * np.float32(sigma))
    np.testing.assert_allclose(both[1], expected[0], rtol=1e-5)
