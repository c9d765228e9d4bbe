"""Differential tests: multisal's torch backend against independent references on the same inputs.

References are Captum, pytorch-grad-cam, torch-cam, and plain torch autograd with the papers'
formulas written out here. "Agree" is DESIGN.md's numerical agreement (helpers.assert_agree);
formulas evaluated on the same activations and gradients use tol=1e-5.
"""
import numpy as np
import pytest
import torch
from torch import nn

import multisal as ms
from multisal.maps import resize_maps, scale_01
from helpers import agreement, agrees, assert_agree

LAYER = "features.4"          # the CAM layer: a conv with a ReLU after it, 16x16 at 32x32 input
TARGETS = np.array([1, 4, 7])
FORMULA = 1e-5


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture
def be(model):
    return ms.load_backend("torch", model=model, device="cpu")


@pytest.fixture
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()


def noise_array(n, shape, sigma, seed):
    return (sigma * np.random.default_rng(seed).standard_normal((n, *shape))).astype(np.float32)


# ---- plain torch references --------------------------------------------------------------------
def torch_input_grad(model, x, target, objective="logit"):
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).requires_grad_(True)
    out = model(xt)
    scores = {"logit": out, "softmax": torch.softmax(out, 1), "log_softmax": torch.log_softmax(out, 1)}[objective]
    value = scores.gather(1, torch.as_tensor(target).long()[:, None]).sum()
    return torch.autograd.grad(value, xt)[0].numpy()


def torch_layer(model, x, target, layer=LAYER):
    """Activation A and d logit[target] / d A at `layer`, by a forward hook and autograd.grad."""
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    finally:
        handle.remove()
    value = out.gather(1, torch.as_tensor(target).long()[:, None]).sum()
    grad = torch.autograd.grad(value, captured[0])[0]
    return captured[0].detach().numpy().astype(np.float64), grad.numpy().astype(np.float64)


def paper_gradcam_pp(A, d1, d2, d3, filters=None, mask=None):
    """Grad-CAM++ (Chattopadhay et al.) from derivatives or their noisy means, written out."""
    S = A.sum(axis=(2, 3), keepdims=True)
    alpha = np.zeros_like(d1)
    nz = d1 != 0
    alpha[nz] = d2[nz] / (2 * d2 + S * d3)[nz]
    w = (alpha * np.maximum(d1, 0)).sum(axis=(2, 3))
    if mask is not None:
        A = A * mask
    if filters is not None:
        return np.maximum(w[:, filters, None, None] * A[:, filters], 0)
    return np.maximum((w[:, :, None, None] * A).sum(axis=1), 0)


def minmax(maps):
    lo = maps.min(axis=(-2, -1), keepdims=True)
    return (maps - lo) / (maps.max(axis=(-2, -1), keepdims=True) - lo)


# ---- vanilla gradient ---------------------------------------------------------------------------
def test_vanilla_gradient_matches_captum_saliency(model, be, x):
    from captum.attr import Saliency
    xt, tt = torch.from_numpy(x), torch.from_numpy(TARGETS)
    raw = Saliency(model).attribute(xt, target=tt, abs=False).detach().numpy()
    assert_agree(ms.vanilla_gradient(be, x, TARGETS, channel_reduce=None, abs=False), raw)
    absmax = Saliency(model).attribute(xt, target=tt, abs=True).detach().numpy().max(axis=1)
    assert_agree(ms.vanilla_gradient(be, x, TARGETS, channel_reduce="max", abs=True), absmax)


@pytest.mark.parametrize("objective", ["softmax", "log_softmax"])
def test_vanilla_gradient_objectives_match_autograd(model, be, x, objective):
    expected = torch_input_grad(model, x, TARGETS, objective)
    actual = ms.vanilla_gradient(be, x, TARGETS, objective=objective, channel_reduce=None, abs=False)
    assert_agree(actual, expected)
    assert not agrees(actual, torch_input_grad(model, x, TARGETS, "logit"))  # the objective matters


# ---- integrated gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["riemann_right", "gausslegendre"])
@pytest.mark.parametrize("nonzero_baseline", [False, True])
def test_integrated_gradients_matches_captum(model, be, x, method, nonzero_baseline):
    from captum.attr import IntegratedGradients
    baseline = noise_array(1, x.shape, 0.5, 3)[0] if nonzero_baseline else None
    expected = IntegratedGradients(model).attribute(
        torch.from_numpy(x), baselines=None if baseline is None else torch.from_numpy(baseline),
        target=torch.from_numpy(TARGETS), n_steps=20, method=method).detach().numpy()
    actual = ms.integrated_gradients(be, x, TARGETS, baseline=baseline, steps=20, method=method)
    assert_agree(actual, expected)


# ---- Grad-CAM -----------------------------------------------------------------------------------
def test_gradcam_matches_captum_layer_gradcam(model, be, x):
    from captum.attr import LayerGradCam
    expected = LayerGradCam(model, model.features[4]).attribute(
        torch.from_numpy(x), target=torch.from_numpy(TARGETS), relu_attributions=True)
    assert expected.shape == (3, 1, 16, 16)
    actual = ms.gradcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False)
    assert_agree(actual, expected.detach().numpy()[:, 0])


def _pytorch_grad_cam_raw(cam_class, model, x, targets, layer=LAYER):
    """pytorch-grad-cam's raw cam at layer resolution, rebuilt from its own hooks as BaseCAM does
    (compute_cam_per_layer: get_cam_image, then np.maximum(cam, 0), before scale_cam_image). The
    gradient-free classes (EigenCAM, ScoreCAM, AblationCAM) get the activations of a forward pass
    and make their own passes inside get_cam_image."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    module = dict(model.named_modules())[layer]
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    xt = torch.from_numpy(x)
    with cam_class(model=model, target_layers=[module]) as cam:
        if cam.uses_gradients:
            cam(input_tensor=xt, targets=cam_targets)
            grads = cam.activations_and_grads.gradients[0].numpy()
        else:
            with torch.no_grad():
                cam.activations_and_grads(xt)
            grads = None
        acts = cam.activations_and_grads.activations[0].numpy()
        return np.maximum(cam.get_cam_image(xt, module, cam_targets, acts, grads, False), 0)


def _torchcam_raw(cam_class, model, x, targets, layer=LAYER):
    """torch-cam's cam at layer resolution, before its normalisation (ReLU applied, as it does)."""
    with cam_class(model, layer, input_shape=tuple(x.shape[1:])) as extractor:
        scores = model(torch.from_numpy(x))
        return extractor(class_idx=[int(t) for t in targets], scores=scores, normalized=False)[0].detach().numpy()


def test_gradcam_matches_pytorch_grad_cam(model, be, x):
    from pytorch_grad_cam import GradCAM
    expected = _pytorch_grad_cam_raw(GradCAM, model, x, TARGETS)
    assert_agree(ms.gradcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False), expected)


def test_gradcam_upsample_and_normalize(model, be, x):
    from captum.attr import LayerAttribution
    raw = ms.gradcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False)
    full = ms.gradcam(be, x, TARGETS, layer=LAYER)
    assert full.shape == (3, 32, 32)
    assert_agree(full, scale_01(resize_maps(raw, (32, 32))), tol=FORMULA)
    up = LayerAttribution.interpolate(torch.from_numpy(raw)[:, None], (32, 32), "bilinear")
    assert_agree(full, minmax(up[:, 0].numpy()))


# ---- Grad-CAM++ ---------------------------------------------------------------------------------
def test_gradcam_pp_eps_matches_pytorch_grad_cam(model, be, x):
    from pytorch_grad_cam import GradCAMPlusPlus
    expected = _pytorch_grad_cam_raw(GradCAMPlusPlus, model, x, TARGETS)
    actual = ms.gradcam_pp(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False, eps=1e-6)
    assert_agree(actual, expected)


def test_gradcam_pp_matches_paper_formula(model, be, x):
    A, g = torch_layer(model, x, TARGETS)
    assert (g == 0).mean() > 0.2   # the ReLU after the layer makes the gradient sparse
    expected = paper_gradcam_pp(A, g, g ** 2, g ** 3)
    assert_agree(ms.gradcam_pp(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False), expected,
                 tol=FORMULA)


def test_torchcam_gradcampp_is_not_the_paper_formula(model, x):
    # torch-cam's GradCAMpp is not the reference multisal follows: it documents and computes
    # sum_ab(A_ab * g_ab^3) in alpha's denominator where the paper has sum_ab(A_ab) * g_ij^3, and
    # (torch-cam 0.5.0) its masked in-place division `alpha[idx][mask].div_(...)` divides a copy,
    # so its alpha stays g^2. Measured here: relative L2 error 1.0 against the paper's formula.
    from torchcam.methods import GradCAMpp
    A, g = torch_layer(model, x, TARGETS)
    paper = paper_gradcam_pp(A, g, g ** 2, g ** 3)
    with GradCAMpp(model, LAYER, input_shape=(3, 32, 32)) as extractor:
        scores = model(torch.from_numpy(x))
        theirs = extractor(class_idx=TARGETS.tolist(), scores=scores, normalized=False)[0].numpy()
    rel_l2, _ = agreement(theirs, paper)
    if not agrees(theirs, paper):
        assert rel_l2 > 1e-2


# ---- Smooth Grad-CAM++ --------------------------------------------------------------------------
def _box_or_points(neurons, region, hw):
    mask = np.zeros(hw)
    if region:
        (r0, c0), (r1, c1) = neurons[:2]
        for r in range(min(r0, r1), max(r0, r1) + 1):
            for c in range(min(c0, c1), max(c0, c1) + 1):
                mask[r, c] = 1
    else:
        for r, c in neurons:
            mask[r, c] = 1
    return mask


@pytest.mark.parametrize("filters, neurons, region", [
    (None, None, False),
    ([0, 2], None, False),
    (None, [(2, 3), (9, 12), (15, 0)], False),
    (None, [(6, 10), (2, 3)], True),
])
def test_smooth_gradcam_pp_matches_paper_formula(model, be, x, filters, neurons, region):
    noise = noise_array(3, x.shape[1:], 0.4, 5)
    A, _ = torch_layer(model, x, TARGETS)
    gs = np.stack([torch_layer(model, x + noise[s], TARGETS)[1] for s in range(3)])
    d1, d2, d3 = gs.mean(0), (gs ** 2).mean(0), (gs ** 3).mean(0)
    mask = None if neurons is None else _box_or_points(neurons, region, A.shape[2:])
    expected = paper_gradcam_pp(A, d1, d2, d3, filters=filters, mask=mask)
    actual = ms.smooth_gradcam_pp(be, x, TARGETS, layer=LAYER, noise=noise, filters=filters, neurons=neurons,
                                  region=region, upsample=False, normalize=False)
    assert actual.shape == expected.shape
    assert expected.any()
    assert_agree(actual, expected, tol=FORMULA)


# ---- Layer-CAM, XGrad-CAM, HiResCAM --------------------------------------------------------------
def test_layercam_matches_pytorch_grad_cam_and_torchcam(model, be, x):
    from pytorch_grad_cam import LayerCAM
    from torchcam.methods import LayerCAM as TorchcamLayerCAM
    actual = ms.layercam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False)
    assert_agree(actual, _pytorch_grad_cam_raw(LayerCAM, model, x, TARGETS))
    assert_agree(actual, _torchcam_raw(TorchcamLayerCAM, model, x, TARGETS))
    A, g = torch_layer(model, x, TARGETS)
    assert_agree(actual, np.maximum((np.maximum(g, 0) * A).sum(axis=1), 0), tol=FORMULA)


def test_hirescam_matches_pytorch_grad_cam_and_the_paper(model, be, x):
    from pytorch_grad_cam import HiResCAM
    actual = ms.hirescam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False)
    assert_agree(actual, _pytorch_grad_cam_raw(HiResCAM, model, x, TARGETS))
    A, g = torch_layer(model, x, TARGETS)
    assert_agree(actual, np.maximum((g * A).sum(axis=1), 0), tol=FORMULA)
    # The ReLU after the layer makes g vary over positions: here the elementwise product is not Grad-CAM.
    assert not agrees(actual, ms.gradcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False))


def paper_xgradcam(A, g):
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij A_kij / (sum_ab A_kab) * g_kij."""
    w = (A / A.sum(axis=(2, 3), keepdims=True) * g).sum(axis=(2, 3))
    return np.maximum((w[:, :, None, None] * A).sum(axis=1), 0)


def test_xgradcam_matches_the_paper_and_with_their_epsilons_the_libraries(model, be, x):
    from pytorch_grad_cam import XGradCAM
    from torchcam.methods import XGradCAM as TorchcamXGradCAM
    A, g = torch_layer(model, x, TARGETS)
    paper = ms.xgradcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False)
    assert_agree(paper, paper_xgradcam(A, g), tol=FORMULA)
    assert_agree(ms.xgradcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False, eps=1e-7),
                 _pytorch_grad_cam_raw(XGradCAM, model, x, TARGETS))
    assert_agree(ms.xgradcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False, eps=1e-8),
                 _torchcam_raw(TorchcamXGradCAM, model, x, TARGETS))


# ---- Eigen-CAM ----------------------------------------------------------------------------------
def paper_eigencam(A, center=False):
    """Eigen-CAM (Muhammad and Yeasin 2020): O (hw x K) = U S V^T, L = O v_1, with v_1 oriented
    so that its entries sum to >= 0 (multisal's convention for the SVD's arbitrary sign)."""
    maps = []
    for a in A.astype(np.float64):
        O = a.reshape(len(a), -1).T
        if center:
            O = O - O.mean(axis=0)
        v = np.linalg.svd(O)[2][0]
        maps.append((O @ (v if v.sum() >= 0 else -v)).reshape(a.shape[1:]))
    return np.maximum(np.array(maps), 0)


def test_eigencam_matches_the_paper_and_centred_pytorch_grad_cam(model, be, x):
    from pytorch_grad_cam import EigenCAM
    A, _ = torch_layer(model, x, TARGETS)
    paper = ms.eigencam(be, x, layer=LAYER, upsample=False, normalize=False)
    assert_agree(paper, paper_eigencam(A), tol=FORMULA)
    centred = ms.eigencam(be, x, layer=LAYER, upsample=False, normalize=False, center=True)
    assert_agree(centred, paper_eigencam(A, center=True), tol=FORMULA)
    assert not agrees(centred, paper)
    # pytorch-grad-cam centres and keeps the sign its SVD returns: its map is relu(P) for its
    # projection P, where multisal's is relu(+-P) with the sign that makes sum_k v_k >= 0, that of
    # P's inner product with the centred channel sum (sum_k v_k = P . (O 1) / s_1^2, v being an
    # eigenvector of O^T O). On these three images the SVD's sign is the other one for all three.
    with EigenCAM(model=model, target_layers=[model.features[4]]) as cam, torch.no_grad():
        cam.activations_and_grads(torch.from_numpy(x))
        projection = cam.get_cam_image(None, None, None, cam.activations_and_grads.activations[0].numpy(), None, False)
    sums = (A - A.mean(axis=(2, 3), keepdims=True)).sum(axis=1)
    signs = np.sign((projection * sums).sum(axis=(1, 2)))[:, None, None]
    assert_agree(centred, np.maximum(signs * projection, 0))
    assert_agree(_pytorch_grad_cam_raw(EigenCAM, model, x, TARGETS), np.maximum(projection, 0))
    # The map is the same whatever the target: there is no class in it.
    assert_agree(ms.eigencam(be, x, target=[0, 0, 0], layer=LAYER), ms.eigencam(be, x, layer=LAYER), tol=FORMULA)


# ---- Score-CAM ----------------------------------------------------------------------------------
FULL_RESOLUTION_LAYER = "features.1"   # 32x32 at 32x32 input: no upsampling, so the libraries' differ in nothing else


def paper_scorecam(model, x, targets, layer, probability=True, channel_softmax=True):
    """Score-CAM (Wang et al. 2020, Algorithm 1) in torch: each feature map upsampled (bilinear),
    min-max scaled, multiplied with the input; weights the softmax over feature maps of the target's
    score rise over a black (zero) input, or the rises themselves."""
    A, _ = torch_layer(model, x, targets, layer)
    at = torch.from_numpy(A)
    maps = torch.nn.functional.interpolate(at.flatten(0, 1)[:, None], size=x.shape[2:], mode="bilinear",
                                           align_corners=False)[:, 0]
    lo, hi = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    masks = torch.where(hi > lo, (maps - lo) / torch.where(hi > lo, hi - lo, 1), 0).reshape(*A.shape[:2], *x.shape[2:])

    def score(inputs, t):
        with torch.no_grad():
            out = model(inputs.float()).double()
        return (out.softmax(1) if probability else out)[:, t]

    xt = torch.from_numpy(x).double()
    weights = []
    for i, t in enumerate(targets):
        rise = score(xt[i] * masks[i][:, None], int(t)) - score(torch.zeros_like(xt[:1]), int(t))
        weights.append(rise.softmax(0) if channel_softmax else rise)
    weights = torch.stack(weights).numpy()
    return np.maximum((weights[:, :, None, None] * A).sum(axis=1), 0)


def test_scorecam_logit_matches_pytorch_grad_cam_and_torchcam(model, be, x):
    from pytorch_grad_cam import ScoreCAM
    from torchcam.methods import ScoreCAM as TorchcamScoreCAM
    actual = ms.scorecam(be, x, TARGETS, layer=FULL_RESOLUTION_LAYER, upsample=False, normalize=False,
                         objective="logit")
    assert_agree(actual, _pytorch_grad_cam_raw(ScoreCAM, model, x, TARGETS, FULL_RESOLUTION_LAYER))
    assert_agree(actual, _torchcam_raw(TorchcamScoreCAM, model, x, TARGETS, FULL_RESOLUTION_LAYER))


@pytest.mark.parametrize("channel_softmax", [True, False])
def test_scorecam_matches_the_paper(model, be, x, channel_softmax):
    actual = ms.scorecam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False, channel_softmax=channel_softmax,
                         batch_size=7)
    expected = paper_scorecam(model, x, TARGETS, LAYER, channel_softmax=channel_softmax)
    assert expected.any()
    assert_agree(actual, expected)
    logit = ms.scorecam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False, objective="logit",
                        channel_softmax=channel_softmax)
    assert_agree(logit, paper_scorecam(model, x, TARGETS, LAYER, False, channel_softmax))
    assert not agrees(logit, actual)   # the probability is not the logit


# ---- Ablation-CAM -------------------------------------------------------------------------------
def paper_ablationcam(model, x, targets, layer):
    """Ablation-CAM (Desai and Ramaswamy 2020): w_k = (y - y_k) / y, y_k the score with feature map
    k of the layer set to zero by a forward hook."""
    A, _ = torch_layer(model, x, targets, layer)
    module = dict(model.named_modules())[layer]
    xt = torch.from_numpy(x)
    with torch.no_grad():
        y = model(xt).double().gather(1, torch.from_numpy(targets)[:, None])[:, 0].numpy()
        drops = np.zeros(A.shape[:2])
        for k in range(A.shape[1]):
            def zero(_m, _i, out, k=k):
                out = out.clone()
                out[:, k] = 0
                return out
            handle = module.register_forward_hook(zero)
            try:
                yk = model(xt).double().gather(1, torch.from_numpy(targets)[:, None])[:, 0].numpy()
            finally:
                handle.remove()
            drops[:, k] = (y - yk) / y
    return np.maximum((drops[:, :, None, None] * A).sum(axis=1), 0)


def test_ablationcam_matches_the_paper_and_pytorch_grad_cam(model, be, x):
    from pytorch_grad_cam import AblationCAM
    # After a ReLU (the layer's minimum is 0) pytorch-grad-cam zeroes the feature map, as the paper does.
    after_relu = "features.5"
    actual = ms.ablationcam(be, x, TARGETS, layer=after_relu, upsample=False, normalize=False, batch_size=5)
    assert_agree(actual, paper_ablationcam(model, x, TARGETS, after_relu))
    assert_agree(actual, _pytorch_grad_cam_raw(AblationCAM, model, x, TARGETS, after_relu))
    # At the conv before that ReLU (negative values) pytorch-grad-cam sets the map to its minimum
    # - 1e7 rather than 0, which the ReLU after it makes 0 as well.
    at_conv = ms.ablationcam(be, x, TARGETS, layer=LAYER, upsample=False, normalize=False)
    assert_agree(at_conv, paper_ablationcam(model, x, TARGETS, LAYER))


def test_pytorch_grad_cams_ablation_of_a_signed_layer_is_not_the_papers(x):
    # A conv whose signed output reaches the pooling and the classifier directly: there
    # pytorch-grad-cam's minimum - 1e7 is not the paper's zero, and its weights are another's.
    from pytorch_grad_cam import AblationCAM
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    be = ms.load_backend("torch", model=net)
    ours = ms.ablationcam(be, x, TARGETS, layer="2", upsample=False, normalize=False)
    assert_agree(ours, paper_ablationcam(net, x, TARGETS, "2"))
    assert not agrees(ours, _pytorch_grad_cam_raw(AblationCAM, net, x, TARGETS, "2"))


# ---- Occlusion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window, stride, baseline", [
    ((3, 16, 16), (3, 8, 8), 0.0),
    ((1, 10, 12), (1, 7, 9), 0.5),      # windows that overhang the edge, one channel at a time
])
def test_occlusion_matches_captum(model, be, x, window, stride, baseline):
    from captum.attr import Occlusion
    expected = Occlusion(model).attribute(torch.from_numpy(x), sliding_window_shapes=window, strides=stride,
                                          baselines=baseline, target=torch.from_numpy(TARGETS),
                                          perturbations_per_eval=8).detach().numpy()
    actual = ms.occlusion(be, x, TARGETS, window=window, stride=stride, baseline=baseline, channel_reduce=None,
                          normalize=False)
    assert_agree(actual, expected)
    assert_agree(ms.occlusion(be, x, TARGETS, window=window, stride=stride, baseline=baseline),
                 scale_01(expected.mean(axis=1)), tol=FORMULA)


# ---- RISE ---------------------------------------------------------------------------------------
def test_rise_masks_are_the_released_codes(x):
    """The paper's code (eclique/RISE, generate_masks): each binary grid resized with skimage
    (order=1, mode="reflect", anti_aliasing=False) to (s + 1) * ceil(H / s) pixels a side, then
    cropped at the mask's shift."""
    from skimage.transform import resize
    from multisal.methods.rise import RiseMasks, rise_masks
    for size, grid in (((32, 32), 7), ((30, 44), 5)):
        draws = RiseMasks(size, 20, grid, 0.5, seed=3)
        cell = np.ceil(np.array(size) / grid).astype(int)
        expected = np.stack([resize(g, (grid + 1) * cell, order=1, mode="reflect", anti_aliasing=False)
                             [dy:dy + size[0], dx:dx + size[1]] for g, (dy, dx) in zip(draws.grids, draws.shifts)])
        masks = rise_masks(size, 20, grid, 0.5, seed=3)
        assert_agree(masks, expected, tol=FORMULA)
        assert 0.3 < draws.grids.mean() < 0.7 and len({tuple(s) for s in draws.shifts}) > 1
    assert not agrees(rise_masks((32, 32), 20, 7, 0.5, seed=4), rise_masks((32, 32), 20, 7, 0.5, seed=3))


def test_rise_matches_the_paper_formula_on_its_masks(model, be, x):
    from multisal.methods.rise import rise_masks
    n, p = 64, 0.3
    masks = rise_masks(x.shape[2:], n, grid=4, p=p, seed=1)
    with torch.no_grad():
        probs = torch.stack([model(torch.from_numpy(x[i] * masks[:, None])).double().softmax(1)[:, t]
                             for i, t in enumerate(TARGETS)]).numpy()        # (images, masks)
    expected = np.einsum("im,mhw->ihw", probs, masks) / (n * p)
    actual = ms.rise(be, x, TARGETS, n_masks=n, grid=4, p=p, seed=1, normalize=False, batch_size=10)
    assert_agree(actual, expected)
    assert_agree(ms.rise(be, x, TARGETS, n_masks=n, grid=4, p=p, seed=1), scale_01(expected), tol=FORMULA)
    assert not agrees(ms.rise(be, x, TARGETS, n_masks=n, grid=4, p=p, seed=2, normalize=False), expected)


# ---- SmoothGrad ---------------------------------------------------------------------------------
def test_smoothgrad_explicit_noise(model, be, x):
    noise = noise_array(4, x.shape[1:], 0.5, 11)
    grads = np.stack([torch_input_grad(model, x + noise[s], TARGETS) for s in range(4)])
    actual = ms.smoothgrad(be, x, TARGETS, noise=noise)
    per_call = np.mean([ms.vanilla_gradient(be, x + noise[s], TARGETS) for s in range(4)], axis=0)
    assert_agree(actual, per_call)
    assert_agree(actual, np.abs(grads).max(axis=2).mean(axis=0))
    assert_agree(ms.smoothgrad(be, x, TARGETS, noise=noise, square=True), (grads ** 2).max(axis=2).mean(axis=0))
    assert_agree(ms.smoothgrad(be, x, TARGETS, noise=noise, channel_reduce=None), np.abs(grads).mean(axis=0))


def test_smoothgrad_legacy_noise_matches_chainer_writeup_loop(model, be, x):
    x1, sigma, n = x[:1], 0.3, 5
    with torch.no_grad():   # tie the two best classes on the clean input, so the noise decides the argmax
        out = model(torch.from_numpy(x1))[0]
        first, second = out.argsort(descending=True)[:2]
        model.fc.bias[second] += out[first] - out[second]
    state = np.random.get_state()
    try:
        np.random.seed(7)
        maps, classes = [], []
        for _ in range(n):
            xs = x1.copy()
            xs += sigma * np.random.randn(1, *x1.shape[1:])   # float32 += float64, in place
            xt = torch.from_numpy(xs).requires_grad_(True)
            out = model(xt)
            c = int(out.argmax(1))
            classes.append(c)
            maps.append(np.abs(torch.autograd.grad(out[0, c], xt)[0].numpy()).max(axis=1))
    finally:
        np.random.set_state(state)
    assert len(set(classes)) > 1   # so "argmax_per_sample" is put to the test
    expected = np.mean(maps, axis=0)
    actual = ms.smoothgrad(be, x1, n=n, sigma=sigma, noise="legacy", seed=7, target="argmax_per_sample",
                           objective="logit", channel_reduce="max")
    assert_agree(actual, expected)


def test_smoothgrad_reduces_channels_per_sample_before_the_mean(model, be, x):
    noise = noise_array(8, x.shape[1:], 1.0, 13)
    grads = np.stack([torch_input_grad(model, x + noise[s], TARGETS) for s in range(8)])
    mean_of_max = np.abs(grads).max(axis=2).mean(axis=0)
    max_of_mean = np.abs(grads.mean(axis=0)).max(axis=1)
    rel_l2, _ = agreement(max_of_mean, mean_of_max)
    assert rel_l2 > 0.05            # the two orders are far apart (tolerance is 1e-3)
    actual = ms.smoothgrad(be, x, TARGETS, noise=noise)
    assert_agree(actual, mean_of_max)
    assert not agrees(actual, max_of_mean)


# ---- batching, parameters, pruning --------------------------------------------------------------
def test_smoothgrad_batch_size_independent(be, x):
    one = ms.smoothgrad(be, x, TARGETS, n=7, sigma=0.5, batch_size=1)
    seven = ms.smoothgrad(be, x, TARGETS, n=7, sigma=0.5, batch_size=7)
    assert_agree(one, seven)


@pytest.mark.parametrize("noise", ["normal", "legacy"])
def test_noisy_methods_give_each_image_its_own_noise(be, x, noise):
    # Each image draws from its own stream: its map does not depend on the images beside it, so a
    # batch job gives the same map whatever batch an image lands in. Two copies of one image in a
    # batch get the same noise, and an image's noise differs from seed to seed.
    many = np.concatenate([x, x[:1]])
    targets = np.r_[TARGETS, TARGETS[:1]]
    calls = {
        "smoothgrad": lambda xs, t, seed=0: ms.smoothgrad(be, xs, t, n=5, sigma=0.5, noise=noise, seed=seed, batch_size=4),
        "auto": lambda xs, t, seed=0: ms.smoothgrad(be, xs, t, n="auto", tol=0.3, max_n=40, sigma=0.5, noise=noise,
                                                    seed=seed, batch_size=4),
        "smooth_gradcam_pp": lambda xs, t, seed=0: ms.smooth_gradcam_pp(be, xs, t, layer=LAYER, n=5, sigma=0.5,
                                                                        noise=noise, seed=seed, batch_size=4),
    }
    for name, call in calls.items():
        together = call(many, targets)
        for i in range(len(x)):
            assert_agree(together[i], call(x[i:i + 1], TARGETS[i:i + 1])[0])
        assert_agree(together[0], together[-1])
        assert not agrees(call(x[:1], TARGETS[:1], seed=1)[0], together[0]), name


def test_backend_chunking_gives_same_gradients(model, be, x):
    tiny = ms.load_backend("torch", model=model, memory_budget=1)
    assert tiny.batch_size(x.shape[1:]) == 1 and be.batch_size(x.shape[1:]) >= len(x)
    assert_agree(ms.vanilla_gradient(tiny, x, TARGETS, channel_reduce=None, abs=False),
                 ms.vanilla_gradient(be, x, TARGETS, channel_reduce=None, abs=False))


def test_backend_computes_no_parameter_gradient(model, be, x):
    model.fc.bias.requires_grad_(False)           # a frozen parameter must stay frozen
    flags = [p.requires_grad for p in model.parameters()]
    ms.vanilla_gradient(be, x, TARGETS)
    ms.gradcam(be, x, TARGETS, layer=LAYER)
    ms.smoothgrad(be, x, TARGETS, n=2, sigma=0.1)
    ms.integrated_gradients(be, x, TARGETS, steps=2)
    ms.smooth_gradcam_pp(be, x, TARGETS, layer=LAYER, n=2, sigma=0.1)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_gradcam_prunes_backward_below_its_layer(model, be, x):
    calls = []
    model.features[2].register_full_backward_hook(lambda m, gi, go: calls.append(1))
    ms.gradcam(be, x, TARGETS, layer=LAYER)
    ms.gradcam_pp(be, x, TARGETS, layer=LAYER)
    assert calls == []
    ms.vanilla_gradient(be, x, TARGETS)
    assert len(calls) > 0
