"""The torch backend's seam: objectives, regions, layers, errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import multisal as ms
from helpers import agrees, assert_agree


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
    (lambda be, x: ms.occlusion(be, x), r"window \(3, 16, 16\) is larger than the image \(3, 12, 12\)"),
    (lambda be, x: ms.occlusion(be, x, window=(3, 4, 4), stride=(3, 5, 5)),
     r"stride \(3, 5, 5\) is larger than the window \(3, 4, 4\): the windows would leave elements"),
    (lambda be, x: ms.occlusion(be, x, window=(3, 4, 4), stride=(3, 0, 4)), r"stride=\(3, 0, 4\): expected 3 integers >= 1"),
    (lambda be, x: ms.occlusion(be, x, window=(4, 4)), r"window=\(4, 4\): expected 3 integers >= 1 \(channels"),
    (lambda be, x: ms.occlusion(be, np.zeros((1, 3, 200, 200), np.float32), window=(1, 1, 1), stride=(1, 1, 1)),
     r"window \(1, 1, 1\) with stride \(1, 1, 1\) gives 120000 windows per image, over the limit of 100000"),
    (lambda be, x: ms.occlusion(be, x, window=(3, 4, 4), stride=(3, 4, 4), baseline=np.zeros(5)),
     r"baseline of shape \(5,\) does not broadcast"),
    (lambda be, x: ms.rise(be, x, n_masks=0), "n_masks=0: expected an integer >= 1 and <= 100000"),
    (lambda be, x: ms.rise(be, x, n_masks=10 ** 6), "n_masks=1000000: expected an integer >= 1 and <= 100000"),
    (lambda be, x: ms.rise(be, x, grid=0), "grid=0: expected an integer >= 1"),
    (lambda be, x: ms.rise(be, x, p=0), r"p=0: the probability of keeping a grid cell must be in \(0, 1\]"),
    (lambda be, x: ms.rise(be, x, batch_size=0), r"batch_size=0 must be an integer 1..4096"),
    (lambda be, x: ms.scorecam(be, x, layer="6"), r"layer '6' gives an activation of shape \(3, 5\); a CAM needs a 4-D"),
    (lambda be, x: ms.ablationcam(be, x, layer="6"), r"layer '6' gives an activation of shape \(3, 5\); a CAM needs a 4-D"),
    (lambda be, x: ms.eigencam(be, x, layer="6"), r"layer '6' gives an activation of shape \(3, 5\); a CAM needs a 4-D"),
    (lambda be, x: ms.layercam(be, x, layer="6"), r"layer '6' gives an activation of shape \(3, 5\); a CAM needs a 4-D"),
    (lambda be, x: be.run(x, replace={"1": np.zeros((3, 6, 5, 5), np.float32)}),
     r"replace\['1'\] has shape \(3, 6, 5, 5\); layer '1' gives \(3, 6, 12, 12\) for these inputs"),
    (lambda be, x: ms.load_backend("torch", model="net.pt"), "needs a torch.nn.Module, got str"),
    (lambda be, x: ms.load_backend("torch", model=be.model, device="tpu"), "device 'tpu' is not usable by torch"),
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


# ---- BatchNorm folding (backends/torch/fold.py) ----------------------------------------------------


class _PaddedConv(torch.nn.Conv2d):
    """A conv subclass with its own forward (as EfficientNet's TF "SAME" padding): still folded."""

    def forward(self, x):
        return super().forward(F.pad(x, [1, 1, 1, 1]))


class _ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = _PaddedConv(3, 6, 3, bias=False), torch.nn.BatchNorm2d(6), torch.nn.ReLU6()
        self.conv2, self.bn2 = torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 5))

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        c = self.conv2(h)
        return self.head(self.bn2(c) + c)     # conv2's output feeds more than its BatchNorm: not foldable


def _conv_bn():
    """_ConvBN in eval mode with BatchNorm statistics and affine parameters far from identity."""
    torch.manual_seed(0)
    return _randomized_bn(_ConvBN())


def _randomized_bn(net):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _counting(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _assert_same_function_float64(net, folded, x):
    """Outputs and the input gradient of one class's score, up to float64 rounding."""
    x.requires_grad_(True)
    expected, actual = net(x), folded(x)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    (g_expected,) = torch.autograd.grad(expected[:, 3].sum(), x)
    (g_actual,) = torch.autograd.grad(actual[:, 3].sum(), x)
    torch.testing.assert_close(g_actual, g_expected, rtol=1e-10, atol=1e-14)


def test_folding_computes_the_same_function_and_input_gradient():
    from multisal.backends.torch.fold import fold_batchnorm
    net = _conv_bn().double()
    folded, count = fold_batchnorm(net)
    assert count == 1                                  # conv1+bn1; conv2 feeds bn2 and the sum
    assert folded.conv1 is not net.conv1 and folded.bn2 is net.bn2 and folded.get_submodule("head.2") is net.head[2]
    _assert_same_function_float64(net, folded, torch.randn(4, 3, 10, 10, dtype=torch.float64))
    assert torch.equal(net.conv1.weight, _conv_bn().double().conv1.weight)   # the model is untouched


def test_kept_layers_are_neither_folded_nor_traced_into():
    from multisal.backends.torch.fold import fold_batchnorm
    net = _conv_bn()
    assert fold_batchnorm(net, keep={"bn1"})[1] == 0
    assert fold_batchnorm(net, keep={"conv1"})[1] == 0
    shared = {}
    folded, count = fold_batchnorm(net, keep={"head"}, folded_convs=shared)
    assert count == 1 and [n.target for n in folded.graph.nodes if n.op == "call_module"][-1] == "head"
    other, _ = fold_batchnorm(net, keep={"act1"}, folded_convs=shared)
    assert other.conv1 is folded.conv1 is shared["conv1"]      # variants share their folded convs


def test_backend_runs_the_folded_model_and_reports_the_same_maps():
    x = np.random.default_rng(2).standard_normal((3, 3, 10, 10)).astype(np.float32)
    folding, plain = (ms.load_backend("torch", model=_conv_bn(), fold_batchnorm=flag) for flag in (True, False))
    bn_calls = _counting(folding.model.bn1)
    assert_agree(ms.vanilla_gradient(folding, x, 1, channel_reduce=None, abs=False),
                 ms.vanilla_gradient(plain, x, 1, channel_reduce=None, abs=False))
    bn_calls.clear()
    ms.smoothgrad(folding, x, 1, n=4)
    assert not bn_calls                                 # folded away
    for layer in ("bn1", "act1", "conv2"):             # asked-for layers keep their own values
        assert_agree(ms.gradcam(folding, x, 1, layer=layer), ms.gradcam(plain, x, 1, layer=layer), tol=1e-5)
    assert all(not m._forward_hooks for name, m in folding.model.named_modules() if name != "bn1")


def test_a_replaced_layer_of_a_folded_model_is_the_layer_as_written():
    # conv1 is kept whole (not folded with bn1), so replacing its output feeds bn1 as in the model.
    x = np.random.default_rng(2).standard_normal((3, 3, 10, 10)).astype(np.float32)
    folding = ms.load_backend("torch", model=_conv_bn())
    net = _conv_bn()
    replacement = np.random.default_rng(3).standard_normal((3, 6, 10, 10)).astype(np.float32)
    with torch.no_grad():
        h = net.act1(net.bn1(torch.from_numpy(replacement)))
        c = net.conv2(h)
        expected = net.head(net.bn2(c) + c).numpy()
    assert_agree(folding.run(x, replace={"conv1": replacement}).outputs, expected)
    assert not agrees(folding.predict(x), expected)
    assert all(not m._forward_hooks for m in folding.model.modules())


def test_changed_weights_are_folded_anew():
    """A model trained or reloaded between calls: the folded copies follow its weights."""
    net = _conv_bn()
    x = np.random.default_rng(5).standard_normal((2, 3, 10, 10)).astype(np.float32)
    be = ms.load_backend("torch", model=net)
    before = ms.vanilla_gradient(be, x, 1, channel_reduce=None, abs=False)
    with torch.no_grad():
        net.bn1.running_var.mul_(4)                    # in place, as an optimizer or load_state_dict does
        net.conv1.weight = torch.nn.Parameter(net.conv1.weight * -1)   # a new tensor
    after = ms.vanilla_gradient(be, x, 1, channel_reduce=None, abs=False)
    plain = ms.vanilla_gradient(ms.load_backend("torch", model=net, fold_batchnorm=False), x, 1,
                                channel_reduce=None, abs=False)
    assert not agrees(after, before)
    assert_agree(after, plain)


class _Untraceable(_ConvBN):
    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        if h.sum() > 0:                                 # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.head(self.bn2(self.conv2(h)))


def test_a_model_torch_fx_cannot_trace_runs_as_it_is():
    net = _Untraceable()
    net.load_state_dict(_conv_bn().state_dict())
    be = ms.load_backend("torch", model=net.eval())
    bn_calls = _counting(net.bn1)
    x = np.random.default_rng(3).standard_normal((2, 3, 10, 10)).astype(np.float32)
    got = ms.vanilla_gradient(be, x, 0, channel_reduce=None, abs=False)
    xt = torch.from_numpy(x).requires_grad_(True)
    (expected,) = torch.autograd.grad(net(xt)[:, 0].sum(), xt)
    assert bn_calls and np.array_equal(got, expected.numpy())


@pytest.mark.parametrize("family, pairs", [
    ("resnet18", 20), ("mobilenet_v3_small", 34), ("densenet121", 59), ("shufflenet_v2_x0_5", 56),
    ("efficientnet_b0", 49),
])
def test_folding_torchvision_families_is_exact_in_float64(family, pairs):
    """Residual adds, in-place ReLUs, concatenations, channel shuffles, squeeze-excitation: the folded
    model's outputs and input gradient are the model's up to float64 rounding."""
    import torchvision
    from multisal.backends.torch.fold import fold_batchnorm
    torch.manual_seed(0)
    net = _randomized_bn(getattr(torchvision.models, family)(weights=None)).double()
    folded, count = fold_batchnorm(net)
    assert count == pairs
    _assert_same_function_float64(net, folded, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_a_kept_container_layer_is_hooked_whole():
    """A block container asked for as a layer stays one module in the folded model, its hooks fire,
    and the folding around it still happens."""
    import torchvision
    torch.manual_seed(0)
    net = _randomized_bn(torchvision.models.resnet18(weights=None))
    x = np.random.default_rng(4).standard_normal((2, 3, 64, 64)).astype(np.float32)
    folding, plain = (ms.load_backend("torch", model=net, fold_batchnorm=flag) for flag in (True, False))
    layer = "layer4"
    got, expected = (be.run(x, "logit", np.array([3, 3]), layers=[layer]) for be in (folding, plain))
    assert_agree(got.activations[layer], expected.activations[layer], tol=1e-5)
    assert_agree(got.gradients[layer], expected.gradients[layer], tol=1e-5)
    bn_calls = _counting(net.bn1)
    folding.run(x, "logit", np.array([3, 3]), layers=[layer])
    assert not bn_calls


@pytest.mark.parametrize("build, pairs", [
    (lambda: ms.models.load("efficientnet-lite0"), 49),   # every conv, the TF-padded ones included
    (lambda: __import__("torchvision").models.resnet18(weights=None), 20),
])
def test_real_models_fold_every_conv_batchnorm_pair(build, pairs):
    from multisal.backends.torch.fold import fold_batchnorm
    assert fold_batchnorm(build().eval())[1] == pairs


def test_folded_gradients_are_as_close_to_float64_as_the_models_own():
    """Folding moves float32 rounding, so ReLU6 kinks fall differently on a few samples: measured
    against float64, the folded model must be as accurate as the model as written."""
    from helpers import agreement
    from multisal.app.demo import demo_photos
    pre = ms.get_preset("efficientnet-lite")
    x = pre.apply(demo_photos()["chelsea"], size=(224, 224))
    noisy = x + 0.3 * np.random.default_rng(0).standard_normal((12, *x.shape[1:])).astype(np.float32)
    net64 = ms.models.load("efficientnet-lite0").double()
    xt = torch.from_numpy(noisy).double().requires_grad_(True)
    (exact,) = torch.autograd.grad(net64(xt)[:, 285].sum(), xt)
    errors = {}
    for fold in (True, False):
        be = ms.load_backend("torch", model=ms.models.load("efficientnet-lite0"), fold_batchnorm=fold)
        got = be.run(noisy, "logit", np.full(12, 285), input_grad=True).input_grad
        errors[fold] = np.array([agreement(got[i], exact[i].numpy())[0] for i in range(12)])
    assert np.median(errors[True]) < 1e-5 and np.median(errors[False]) < 1e-5
    # Measured: 3 and 2 of the 12 samples past 1e-3 (a flip); a systematic error would move the median.
    assert (errors[True] > 1e-3).sum() <= (errors[False] > 1e-3).sum() + 2, errors


# ---- glibc malloc thresholds (multisal/app/malloc.py) ---------------------------------------------------

_PAGE_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    import multisal
    assert multisal.tune_malloc()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3, padding=1))
x = torch.randn(8, 3, 224, 224, requires_grad=True)      # 49 MiB activations, above glibc's mmap threshold
def step():
    torch.autograd.grad(net(x).sum(), x)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="tunes glibc only")
def test_tuned_malloc_reuses_autograds_large_blocks_instead_of_faulting_them_in_again():
    import subprocess
    import sys
    faults = {mode: int(subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], check=True, capture_output=True,
                                       text=True).stdout) for mode in ("system", "tuned")}
    # Measured: about 408,000 minor faults (every page of every activation, every step) against 12,500.
    assert faults["tuned"] * 10 < faults["system"], faults


# ---- batch size from the memory budget --------------------------------------------------------------


def test_batch_size_counts_each_activation_storage_once():
    # A container's output is its last child's tensor, an in-place ReLU's is its input's, Flatten's a
    # view: the activations are the conv's, the BatchNorm's, the pool's and the logits.
    net = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True)),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    per_sample = 2 * 4 * (8 * 16 * 16 + 8 * 16 * 16 + 8 + 2)     # forward + backward, float32
    be = ms.load_backend("torch", model=net, memory_budget=5 * per_sample + 1)
    assert be.batch_size((3, 16, 16)) == 5


_BUDGETS = """
import torch, multisal as ms
from multisal.backends.torch import backend as torch_backend
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
default, given = ms.load_backend("torch", model=net), ms.load_backend("torch", model=net, memory_budget="3GiB")
before = default.memory_budget
ms.tune_malloc()
print(before == torch_backend.CPU_MEMORY_BUDGET, default.memory_budget == torch_backend.CPU_MEMORY_BUDGET_TUNED_MALLOC,
      given.memory_budget == 3 << 30)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="tunes glibc only")
def test_default_cpu_budget_grows_once_malloc_is_tuned():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _BUDGETS], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["True", "True", "True"]
