"""The torch backend's BatchNorm fold (backends/torch/fold.py) on timm architectures chosen for
folding's hard cases, each with random BatchNorm statistics and affine parameters so that no
BatchNorm is the identity: its input gradient must be plain autograd's on the model as written,
folding must leave the model as it was, and a fold that is not the model's function is refused
once and for all."""
import numpy as np
import pytest
import torch
import torch.fx

import multisal as ms
from helpers import assert_agree

timm = pytest.importorskip("timm")


class _SharedConv(torch.nn.Module):
    """One conv called twice, followed by a BatchNorm only the first time: folding the BatchNorm
    into it would change its second call too."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU()
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10))

    def forward(self, x):
        return self.head(self.conv(self.act(self.bn(self.conv(x)))))


def _levit():
    # LeViT's tokens go through Linear + BatchNorm1d, and its attention caches its biases per device.
    from timm.models.levit import Levit
    return Levit(img_size=32, num_classes=10, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3))


# name: (the model, the conv+BatchNorm pairs that fold in it)
ARCHITECTURES = {
    # timm's BatchNormAct2d (BatchNorm, then its dropout and hard-swish) after every conv, squeeze-excitation.
    "mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10), 34),
    # concatenations, BatchNormAct2d on a concatenation (pre-activation: 6 of 11 have no conv before them).
    "densenet": (lambda: timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 2), bn_size=2, num_classes=10), 5),
    # space-to-depth stem, BatchNormAct2d with leaky ReLU, anti-aliased downsampling.
    "tresnet": (lambda: timm.models.tresnet.TResNet(layers=[1, 1, 1, 1], width_factor=0.25, num_classes=10), 14),
    # BatchNorm after the activation (conv, GELU, BatchNorm): nothing to fold.
    "convmixer": (lambda: timm.models.convmixer.ConvMixer(dim=32, depth=2, kernel_size=3, patch_size=4, num_classes=10), 0),
    # the stem's 4 conv+BatchNorm2d pairs fold; the tokens' BatchNorm1d after Linear stay.
    "levit": (_levit, 4),
    "shared_conv": (_SharedConv, 0),
}


def _randomized_batchnorms(net):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _attributes(model):
    """Every module's attributes by identity, and what the dicts and lists among them hold."""
    state = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            held = None
            if isinstance(value, dict):
                held = [(k, id(v)) for k, v in value.items()]
            elif isinstance(value, list):
                held = [id(v) for v in value]
            state[name, key] = (id(value), held)
    return state


def _proxies(model):
    return [(name, key) for name, module in model.named_modules() for key, value in vars(module).items()
            if isinstance(value, torch.fx.Proxy)
            or (isinstance(value, dict) and any(isinstance(v, torch.fx.Proxy) or isinstance(k, torch.fx.Proxy)
                                                or "Proxy" in str(k) for k, v in value.items()))]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_folded_gradient_is_autograds_and_the_model_is_left_as_it_was(name):
    from multisal.backends.torch.fold import fold_batchnorm
    build, pairs = ARCHITECTURES[name]
    torch.manual_seed(0)
    net = _randomized_batchnorms(build())
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    be = ms.load_backend("torch", model=net)
    net(torch.from_numpy(x))        # the model's own caches, filled as any use of the model fills them
    before = _attributes(net)
    got = be.run(x, "logit", np.array([3, 7]), input_grad=True).input_grad
    assert _attributes(net) == before and not _proxies(net)
    assert fold_batchnorm(net)[1] == pairs and _attributes(net) == before
    assert (be._model_for([], x) is not net) == (pairs > 0), "a fold that computes the model's function was refused"
    xt = torch.from_numpy(x).requires_grad_(True)
    (expected,) = torch.autograd.grad(net(xt)[[0, 1], [3, 7]].sum(), xt)
    assert_agree(got, expected.numpy())
    # In float64 the folded model is the model's function up to float64 rounding: no ReLU or
    # max-pool decision can fall the other way there, as it may in float32.
    net64 = build()
    net64.load_state_dict(net.state_dict())   # not a deepcopy: LeViT's bias cache holds non-leaf tensors
    net64 = net64.double().eval()
    folded64, _ = fold_batchnorm(net64)
    x64 = torch.from_numpy(x).double().requires_grad_(True)
    exact, actual = net64(x64), folded64(x64)
    torch.testing.assert_close(actual, exact, rtol=1e-10, atol=1e-12)
    gradients = [torch.autograd.grad(out[[0, 1], [3, 7]].sum(), x64)[0] for out in (exact, actual)]
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-9, atol=1e-12)


def test_a_layer_inside_a_batchnorm_act_is_hooked_in_the_folded_model():
    """timm's BatchNormAct2d is traced into: its activation runs, so a CAM on it sees what the model
    as written computes."""
    torch.manual_seed(0)
    net = _randomized_batchnorms(ARCHITECTURES["mobilenetv3_small_050"][0]())
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    folding, plain = (ms.load_backend("torch", model=net, fold_batchnorm=flag) for flag in (True, False))
    layer = "blocks.4.2.bn2.act"
    got, expected = (be.run(x, "logit", np.array([3, 3]), layers=[layer]) for be in (folding, plain))
    assert folding._model_for([layer], x) is not net
    assert_agree(got.activations[layer], expected.activations[layer], tol=1e-5)
    assert_agree(got.gradients[layer], expected.gradients[layer])


class _SameOutputsNoGradient(torch.nn.Module):
    """The model's outputs with the input gradient cut off: a fold that only an output check passes."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.detach()) + 0 * x.sum()


class _Raises(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("a graph torch.fx traced that does not run")


@pytest.mark.parametrize("wrong_fold", [_SameOutputsNoGradient, lambda net: _Raises()])
def test_a_refused_fold_is_refused_once(monkeypatch, wrong_fold):
    import multisal.backends.torch.backend as torch_backend
    torch.manual_seed(0)
    net = _randomized_batchnorms(_SharedConv())
    traced = []

    def fold(model, keep=(), folded_convs=None):
        traced.append(keep)
        return wrong_fold(model), 1

    monkeypatch.setattr(torch_backend, "fold_batchnorm", fold)
    be = ms.load_backend("torch", model=net)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    (expected,) = torch.autograd.grad(net(xt)[:, 3].sum(), xt)
    for _ in range(3):
        assert_agree(be.run(x, "logit", np.array([3, 3]), input_grad=True).input_grad, expected.numpy(), tol=1e-6)
    assert len(traced) == 1
