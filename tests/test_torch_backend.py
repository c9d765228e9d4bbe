"""The torch backend's seam: objectives, regions, layers, errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import multisal as ms
from helpers import assert_agree


def _classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))


@pytest.fixture
def be():
    return ms.load_backend("torch", model=_classifier())


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(np.float32)


def test_chainer_prob_ce_is_cross_entropy_of_the_softmax_output(be, x):
    target = np.array([0, 3, 4])
    got = ms.vanilla_gradient(be, x, target, objective="chainer_prob_ce", channel_reduce=None, abs=False)
    xt = torch.from_numpy(x).requires_grad_(True)
    prob = F.softmax(be.model(xt), dim=1)            # Chainer's layer 'prob'
    loss = F.cross_entropy(prob, torch.from_numpy(target), reduction="sum")   # softmax_cross_entropy(prob, t)
    (ref,) = torch.autograd.grad(loss, xt)
    assert_agree(got, ref.numpy())


def test_objective_gradient_matches_finite_differences(be, x):
    """Central differences in float64 on a float64 copy of the model, one coordinate at a time."""
    model64 = _classifier().double().eval()
    target = np.array([2, 2, 2])
    for objective in ("logit", "softmax", "log_softmax", "chainer_prob_ce"):
        g = be.run(x, objective, target, input_grad=True).input_grad
        value = {"logit": lambda o: o, "softmax": lambda o: o.softmax(1), "log_softmax": lambda o: o.log_softmax(1),
                 "chainer_prob_ce": lambda o: -o.softmax(1).log_softmax(1)}[objective]
        for idx in [(0, 0, 3, 4), (1, 2, 7, 7), (2, 1, 0, 11)]:
            xp, xm = x.astype(np.float64), x.astype(np.float64)
            xp[idx] += 1e-5
            xm[idx] -= 1e-5
            with torch.no_grad():
                fp = value(model64(torch.from_numpy(xp)))[idx[0], 2].item()
                fm = value(model64(torch.from_numpy(xm)))[idx[0], 2].item()
            assert g[idx] == pytest.approx((fp - fm) / 2e-5, rel=1e-3, abs=1e-6), (objective, idx)


def test_region_objective_sums_a_box_of_a_dense_output(x):
    torch.manual_seed(0)
    seg = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    be = ms.load_backend("torch", model=seg)
    got = ms.vanilla_gradient(be, x, ms.region(1, box=(2, 3, 6, 9)), channel_reduce=None, abs=False)
    xt = torch.from_numpy(x).requires_grad_(True)
    (ref,) = torch.autograd.grad(seg(xt)[:, 1, 2:6, 3:9].sum(), xt)
    assert_agree(got, ref.numpy())
    mask = np.zeros((12, 12), bool)
    mask[5, 5] = mask[0, 11] = True
    got = ms.vanilla_gradient(be, x, ms.region(0, mask=mask), channel_reduce=None, abs=False)
    (ref,) = torch.autograd.grad(seg(xt)[:, 0][:, torch.from_numpy(mask)].sum(), xt)
    assert_agree(got, ref.numpy())


def test_sequence_region(x):
    class Seq(torch.nn.Module):      # (N,C,H,W) -> (N,T,C): columns as time steps
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 7, 3, padding=1)

        def forward(self, inp):
            return self.conv(inp).mean(2).transpose(1, 2)

    torch.manual_seed(0)
    net = Seq()
    be = ms.load_backend("torch", model=net)
    got = ms.vanilla_gradient(be, x, ms.region(4, box=(2, 5)), channel_reduce=None, abs=False)
    xt = torch.from_numpy(x).requires_grad_(True)
    (ref,) = torch.autograd.grad(net(xt)[:, 2:5, 4].sum(), xt)
    assert_agree(got, ref.numpy())


def test_layers_and_default_layer(be, x):
    assert be.default_layer(x.shape[1:]) == "3"      # the ReLU after the last conv
    res = be.run(x, "logit", np.array([1, 1, 1]), layers=["1", "3"], input_grad=True)
    assert res.activations["3"].shape == res.gradients["3"].shape == (3, 8, 12, 12)
    assert (res.activations["1"] >= 0).all()
    # d logit / d (input of the average pool) is W[t] / (H*W) where the ReLU passes.
    w = be.model[6].weight.detach().numpy()[1]
    expected = np.broadcast_to(w[None, :, None, None] / 144, res.gradients["3"].shape)
    np.testing.assert_allclose(res.gradients["3"], expected, rtol=1e-5)


def test_forward_hooks_are_removed(be, x):
    with pytest.raises(ms.MultisalError):
        be.run(x, "logit", np.array([9, 9, 9]), layers=["1"], input_grad=True)
    ms.gradcam(be, x, layer="3")
    assert all(not m._forward_hooks for m in be.model.modules())


@pytest.mark.parametrize("call, message", [
    (lambda be, x: ms.vanilla_gradient(be, x[0]), r"shape \(N,C,H,W\), got shape \(3, 12, 12\)"),
    (lambda be, x: ms.vanilla_gradient(be, x.astype(np.int32)), "float32, got dtype int32"),
    (lambda be, x: ms.vanilla_gradient(be, x.tolist()), "numpy array"),
    (lambda be, x: ms.gradcam(be, x, layer="features.3"), r"unknown layer 'features.3' in Sequential: closest: 3"),
    (lambda be, x: ms.gradcam(be, x, layer="6"), r"layer '6' gives an activation of shape \(3, 5\)"),
    (lambda be, x: ms.vanilla_gradient(be, x, target=5), r"target 5 out of range: the model has 5 classes \(0..4\)"),
    (lambda be, x: ms.vanilla_gradient(be, x, target=[1, 2]), "2 entries for 3 images"),
    (lambda be, x: ms.vanilla_gradient(be, x, target="top"), "unknown target 'top'"),
    (lambda be, x: ms.smoothgrad(be, x, sigma=0.1, noise_level=0.2), "give sigma or noise_level, not both"),
    (lambda be, x: ms.smoothgrad(be, x, noise="pink"), "unknown noise 'pink'"),
    (lambda be, x: ms.smoothgrad(be, x, noise=np.zeros((2, 3, 5, 5))), r"noise array has shape \(2, 3, 5, 5\)"),
    (lambda be, x: ms.smoothgrad(be, x, preset="vgg"), "unknown preset 'vgg'"),
    (lambda be, x: ms.vanilla_gradient(be, x, objective="prob"), "unknown objective 'prob': expected one of logit"),
    (lambda be, x: ms.vanilla_gradient(be, x, channel_reduce="sum"), "unknown channel_reduce 'sum'"),
    (lambda be, x: ms.integrated_gradients(be, x, method="simpson"), "unknown integration method 'simpson'"),
    (lambda be, x: ms.smooth_gradcam_pp(be, x, filters=[8]), "filter 8 out of range: the layer has 8"),
    (lambda be, x: ms.smooth_gradcam_pp(be, x, neurons=[(12, 0)]), r"neuron \(12, 0\) is outside the layer's 12x12"),
    (lambda be, x: ms.fooling_image(be, x, None), "needs a class index"),
    (lambda be, x: ms.class_visualization(be, 1), "needs preset="),
    (lambda be, x: ms.vanilla_gradient(be, x, ms.region(0, box=(0, 0, 2, 2))), "region target needs a dense output"),
    (lambda be, x: ms.load_backend("torch", model="net.pt"), "needs a torch.nn.Module, got str"),
    (lambda be, x: ms.load_backend("torch", model=be.model, device="tpu"), "device 'tpu' is not a torch device"),
    (lambda be, x: ms.load_backend("torch", model=be.model, memory_budget="lots"), "memory_budget 'lots' is not a size"),
])
def test_bad_input_is_one_clear_line(be, x, call, message):
    with pytest.raises(ms.MultisalError, match=message) as info:
        call(be, x)
    assert "\n" not in str(info.value)


def test_smoothgrad_auto_stops_when_the_map_settles(be, x):
    # A linear model's gradient does not depend on the noise: the map is settled at the second check.
    torch.manual_seed(0)
    linear = ms.load_backend("torch", model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 4)))
    stats = {}
    m = ms.smoothgrad(linear, x, target=1, n="auto", stats=stats)
    assert stats["samples"].tolist() == [20, 20, 20]
    assert_agree(m, ms.vanilla_gradient(linear, x, target=1))
    # A ReLU network's map keeps moving at a tight tolerance: the cap ends it, per image.
    stats = {}
    ms.smoothgrad(be, x, n="auto", tol=1e-9, max_n=30, stats=stats, noise_level=0.5)
    assert stats["samples"].tolist() == [30, 30, 30]
    with pytest.raises(ms.MultisalError, match="'auto' with noise 'normal' or 'legacy'"):
        ms.smoothgrad(be, x, n="auto", noise=np.zeros((2, 3, 12, 12), np.float32))


def test_default_layer_after_an_in_place_activation():
    # ReLU(inplace=True) hands back the BatchNorm's output tensor, changed: the default is the ReLU's
    # output (what an ONNX export of the model names), not the BatchNorm's, which is the same object.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    be = ms.load_backend("torch", model=net)
    assert be.default_layer((3, 8, 8)) == "2"
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert (be.run(x, layers=["2"]).activations["2"] >= 0).all()
