"""Each metric of multisal.evaluation against an independent implementation on the same maps and
model: the RISE paper's released deletion/insertion procedure written out here in torch (one
image, one forward pass a step, scipy's gaussian_filter kernel and conv2d for the blur),
pytorch-grad-cam's ROAD, Quantus's MPRT, RandomLogit, Sparseness and Complexity, and scipy's
Spearman correlation. Agreement within 1e-4."""
import numpy as np
import pytest
import quantus
import scipy.ndimage
import scipy.stats
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric, RemoveLeastRelevantFirst,
                                                              RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

import multisal as ms
from multisal.evaluation import causal, road, sanity
from multisal.evaluation.common import spearman

SIZE = 32
CLASSES = 6


def _net():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, CLASSES)).eval()


@pytest.fixture(scope="module")
def setup():
    net = _net()
    with torch.no_grad():   # BatchNorm statistics that are not the identity
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
        # Outputs far enough apart that the probabilities move as pixels go.
        net[-1].weight.mul_(30)
    be = ms.load_backend("torch", model=net, preset="raw")
    x = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    maps = {"random": np.random.default_rng(1).random((2, SIZE, SIZE)).astype(np.float32),
            "vanilla_gradient": ms.vanilla_gradient(be, x)}
    return net, be, x, maps


# ---- deletion and insertion: the released evaluation code's procedure -----------------------------
def _gkern(klen, nsig):
    """The released code's blur kernel: gaussian_filter of a delta, on the diagonal of (3, 3, k, k)."""
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    k = scipy.ndimage.gaussian_filter(delta, nsig)
    kern = np.zeros((3, 3, klen, klen))
    for c in range(3):
        kern[c, c] = k
    return torch.from_numpy(kern.astype("float32"))


def _released_causal_curve(net, image, explanation, mode, step):
    """One image as the released CausalMetric.single_run scores it: the softmax model, the class
    of the clean prediction, ceil(HW / step) steps, pixels of decreasing saliency (np.flip of
    np.argsort) copied from `finish` into `start` after each step's forward pass."""
    model = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    hw = SIZE * SIZE
    img = torch.from_numpy(image[None].copy())
    with torch.no_grad():
        c = int(model(img).argmax(1))
        blurred = torch.nn.functional.conv2d(img, _gkern(11, 5), padding=11 // 2)
    start, finish = (img.clone(), torch.zeros_like(img)) if mode == "deletion" else (blurred, img.clone())
    n_steps = (hw + step - 1) // step
    scores = np.empty(n_steps + 1)
    order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores[i] = float(model(start)[0, c])
        if i < n_steps:
            coords = order[:, step * i:step * (i + 1)]
            start.numpy().reshape(1, 3, hw)[0, :, coords] = finish.numpy().reshape(1, 3, hw)[0, :, coords]
    return scores


def _released_auc(arr):
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


def test_blur_kernel_is_gaussian_filter_of_a_delta():
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    expected = scipy.ndimage.gaussian_filter(delta, 5)
    np.testing.assert_allclose(np.outer(causal.blur_kernel(), causal.blur_kernel()), expected, atol=1e-12)


def test_blur_is_the_released_conv2d(setup):
    _, _, x, _ = setup
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), _gkern(11, 5), padding=5).numpy()
    np.testing.assert_allclose(causal.gaussian_blur(x), expected, atol=1e-5)


@pytest.mark.parametrize("mode, step", [("deletion", 37), ("insertion", 50)])
def test_causal_curves_match_the_released_code(setup, mode, step):
    net, be, x, maps = setup
    scores = ms.evaluate(be, x, maps, metrics=[mode], step=step, batch_size=7)
    for name, sal in maps.items():
        ours = causal.causal_curves(be, x, sal, mode, step=step, batch_size=50)
        for i in range(len(x)):
            expected = _released_causal_curve(net, x[i], sal[i], mode, step)
            np.testing.assert_allclose(ours[i], expected, atol=1e-4, err_msg=f"{mode} {name} image {i}")
            assert abs(scores[name][mode][i] - _released_auc(expected)) < 1e-4
        # The curve does move: the check compares more than two constants.
        assert np.ptp(ours) > 0.05


def test_default_step_keeps_the_released_224_steps(setup):
    _, be, x, maps = setup
    curves = causal.causal_curves(be, x[:1], maps["random"][:1], "deletion")
    assert curves.shape == (1, 206)   # ceil(1024 / 224) = 5 pixels a step: ceil(1024 / 5) steps, 206 points


# ---- ROAD: pytorch-grad-cam's imputer and perturbation ---------------------------------------------
def _scaled(sal):
    return (sal - sal.min()) / (sal.max() - sal.min())


def test_linear_imputation_matches_pytorch_grad_cam(setup):
    _, _, x, maps = setup
    cam = _scaled(maps["vanilla_gradient"][0])
    keep = (cam < np.percentile(cam, 70)).astype(np.float32)
    expected = NoisyLinearImputer(noise=0.0)(torch.from_numpy(x[0]), torch.from_numpy(keep)).numpy()
    np.testing.assert_allclose(road.linear_imputation(x[0], keep == 0), expected, atol=1e-5)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_matches_pytorch_grad_cam_without_noise(setup, order):
    """pytorch-grad-cam's RemoveMostRelevantFirst(percentile=q) keeps the pixels below the q-th
    percentile, so removing p percent is its percentile 100 - p; it returns the change of the
    target's probability, ours the probability."""
    net, be, x, maps = setup
    percentages = (10, 35, 80)
    remove = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    xt = torch.from_numpy(x)
    with torch.no_grad():
        clean = torch.softmax(net(xt), 1).numpy()
    target = clean.argmax(1)
    for name, sal in maps.items():
        cams = np.stack([_scaled(m) for m in sal]).astype(np.float32)
        ours = road.road_curves(be, x, cams, order, percentages=percentages, noise=0.0)
        for k, p in enumerate(percentages):
            metric = PerturbationConfidenceMetric(remove(100 - p, NoisyLinearImputer(noise=0.0)))
            change = metric(xt, cams, [ClassifierOutputSoftmaxTarget(int(t)) for t in target], net)
            np.testing.assert_allclose(ours[:, k], change + clean[np.arange(len(x)), target], atol=1e-4,
                                       err_msg=f"{order} {name} at {p}%")
        assert np.ptp(ours) > 0.01


def test_road_noise_is_gaussian_on_the_removed_pixels_only(setup):
    _, _, x, maps = setup
    sal = maps["random"][0]
    clean = road.road_input(x[0], sal, 40, "morf", 0.0, np.random.default_rng(0))
    noisy = road.road_input(x[0], sal, 40, "morf", 0.01, np.random.default_rng(0))
    removed = road.removed_pixels(sal, 40, "morf")
    assert removed.mean() == pytest.approx(0.4, abs=1e-3)
    diff = noisy - clean
    assert np.all(diff[:, ~removed] == 0)
    assert np.std(diff[:, removed]) == pytest.approx(0.01, rel=0.05)
    assert abs(np.mean(diff[:, removed])) < 1e-3


def test_road_removes_p_percent_of_a_constant_map(setup):
    """A threshold would remove every pixel of a constant map (all are at the percentile): the
    ranking removes p percent, as the paper defines ROAD."""
    removed = road.removed_pixels(np.zeros((SIZE, SIZE)), 30, "lerf")
    assert removed.sum() == SIZE * SIZE - int(np.ceil(0.7 * (SIZE * SIZE - 1)))


# ---- sanity checks: Quantus ----------------------------------------------------------------------
def _explain_with(method):
    def explain_func(model, inputs, targets, **kwargs):
        be = ms.load_backend("torch", model=model, preset="raw")
        return method(be, np.asarray(inputs, np.float32), target=np.asarray(targets, np.int64))
    return explain_func


@pytest.mark.parametrize("method", ["eigencam", "vanilla_gradient"])
def test_cascading_randomization_matches_quantus_mprt(setup, method):
    """Quantus seeds torch with seed + 1 before each layer's reset_parameters(); our randomized()
    seeds with seed, so Quantus's seed 4 is our 5."""
    net, be, x, _ = setup
    fn = ms.METHODS[method]
    target = be.predict(x).argmax(1)
    original = fn(be, x, target=target)
    ours, layers = sanity.model_randomization(be, x, lambda b, xx, t: fn(b, xx, target=t), original, target,
                                              steps=None, seed=5)
    metric = quantus.MPRT(layer_order="top_down", seed=4, abs=False, normalise=False, disable_warnings=True,
                          similarity_func=quantus.similarity_func.correlation_spearman)
    theirs = metric(model=net, x_batch=x, y_batch=target, a_batch=original[:, None], explain_func=_explain_with(fn),
                    device="cpu")
    assert layers == [name for name in theirs if name != "original"] == ["7", "3", "1", "0"]
    for k, layer in enumerate(layers):
        np.testing.assert_allclose(ours[:, k], theirs[layer], atol=1e-4, err_msg=f"{method} after layer {layer}")
    assert ours[:, -1].max() < 0.9          # the map does change once the model is random
    # The user's model and backend are untouched.
    np.testing.assert_array_equal(fn(be, x, target=target), original)


def test_random_logit_matches_quantus(setup):
    net, be, x, _ = setup
    target = be.predict(x).argmax(1)
    original = ms.vanilla_gradient(be, x, target=target)
    ours = sanity.random_logit(be, x, lambda b, xx, t: ms.vanilla_gradient(b, xx, target=t), original, target, seed=7)
    metric = quantus.RandomLogit(num_classes=CLASSES, seed=7, abs=False, normalise=False, disable_warnings=True,
                                 similarity_func=quantus.similarity_func.correlation_spearman)
    theirs = metric(model=net, x_batch=x, y_batch=target, a_batch=original[:, None],
                    explain_func=_explain_with(ms.vanilla_gradient), device="cpu")
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.all(sanity.off_classes(target, CLASSES, 7) != target)


# ---- sparseness, complexity, Spearman ------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", [("sparseness", quantus.Sparseness), ("complexity", quantus.Complexity)])
def test_concentration_matches_quantus(setup, ours, theirs):
    net, be, x, maps = setup
    target = be.predict(x).argmax(1)
    sobel = ms.evaluation.sobel_map(be, x)
    for sal in (*maps.values(), sobel, sobel ** 4):
        expected = theirs(disable_warnings=True)(model=net, x_batch=x, y_batch=target, a_batch=sal[:, None].copy(),
                                                 device="cpu")
        got = ms.evaluate(be, x, sal, metrics=[ours])["map"][ours]
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = np.round(rng.random((3, 200)) * 10)          # many ties
    b = a + rng.random((3, 200)) * 4
    expected = [scipy.stats.spearmanr(u, v)[0] for u, v in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b), expected, atol=1e-12)
