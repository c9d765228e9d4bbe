"""Vision transformers and other non-CNN layouts from timm (random weights, small inputs,
tests/timm_models.py), on the torch backend and on their ONNX exports:

- the default CAM layer is the one a practitioner picks, in its layout, and the ONNX backend
  resolves it to the same point (same activations as feature maps);
- Grad-CAM equals pytorch-grad-cam's with its documented reshape_transform on the same layer
  (ViT, DeiT, Swin), and torch and ONNX agree (DESIGN's agreement rule);
- Ablation-CAM on tokens equals the formula with the feature maps zeroed in the model itself;
- attention rollout and transformer attribution equal the papers' formulas written out below,
  on attention probabilities and gradients read with hooks on the timm model;
- the layout overrides, and their one-line errors.
"""
import copy
import warnings

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import multisal as ms
from helpers import assert_agree
from multisal.app.cli import main
from timm_models import MODELS, narrow_vit

TARGETS = np.array([3, 7])


def _inputs(size):
    return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_backends():
    """name -> (the timm model, its torch backend), built once."""
    made = {}

    def get(name):
        if name not in made:
            net = MODELS[name][0]()
            made[name] = net, ms.load_backend("torch", model=net)
            FUSED[name] = _fused(net)
        return made[name]
    return get


# Each model's timm attention switches as created (some are off from the start).
FUSED = {}


def _fused(net):
    return [m.fused_attn for m in net.modules() if hasattr(m, "fused_attn")]


@pytest.fixture(scope="module")
def onnx_backends(tmp_path_factory, torch_backends):
    """name -> its ONNX backend, over a TorchScript export with a free batch (exported once)."""
    folder = tmp_path_factory.mktemp("timm_onnx")
    made = {}

    def get(name):
        if name not in made:
            _, size, attention, *_ = MODELS[name]
            net = MODELS[name][0]()      # a copy of its own: the export must not touch the torch backend's
            if attention == "unfused":
                for module in net.modules():
                    if hasattr(module, "fused_attn"):
                        module.fused_attn = False
            path = folder / f"{name}.onnx"
            with warnings.catch_warnings():   # the TorchScript exporter's deprecation and tracer warnings
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
            made[name] = ms.load_backend("onnx", model=str(path), cache_dir=folder / "cache")
        return made[name]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_default_layer_and_its_layout_on_torch(name, torch_backends):
    net, be = torch_backends(name)
    _, size, _, default, layout = MODELS[name]
    shape = (3, size, size)
    assert be.default_layer(shape) == default
    assert be.layer_layouts(shape)[default].describe() == layout
    assert dict(be.candidate_layers(shape))[default]
    # Every grid position of the default layer feeds the target's score (after a ViT's last attention
    # only the class token does, and a CAM there is zero).
    form = be.layer_layouts(shape)[default]
    res = be.run(_inputs(size), "logit", TARGETS, layers=[default])
    assert (np.abs(form.to_maps(res.gradients[default])).sum(axis=1) > 0).all()
    assert ms.gradcam(be, _inputs(size), target=TARGETS, upsample=False).shape == (2, *form.grid)
    # The attention switch was off only while the backend read the attention probabilities.
    assert _fused(net) == FUSED[name]


@pytest.mark.parametrize("name", MODELS)
def test_onnx_default_layer_is_the_same_point_and_cams_agree(name, torch_backends, onnx_backends):
    _, bt = torch_backends(name)
    bo = onnx_backends(name)
    size = MODELS[name][1]
    x, shape = _inputs(size), (3, size, size)
    lt, lo = bt.default_layer(shape), bo.default_layer(shape)
    assert bo.layer_layouts(shape)[lo].describe() == MODELS[name][4]
    at = bt.layer_layouts(shape)[lt].to_maps(bt.run(x, layers=[lt]).activations[lt])
    ao = bo.layer_layouts(shape)[lo].to_maps(bo.run(x, layers=[lo]).activations[lo])
    assert_agree(ao, at)
    try:
        cam_onnx = ms.gradcam(bo, x, target=TARGETS, upsample=False, normalize=False)
    except ms.MultisalError as err:
        if "no gradient rule for op" not in str(err):
            raise
        pytest.skip(f"{name}'s ONNX gradient graph needs a rule still missing: {err}")
    assert_agree(cam_onnx, ms.gradcam(bt, x, target=TARGETS, upsample=False, normalize=False))


def _tokens_to_maps(prefix, height, width):
    """pytorch-grad-cam's reshape_transform for ViTs (its tutorial's, with the prefix a parameter)."""
    def reshape_transform(tensor):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape_transform


@pytest.mark.parametrize("name, layer, prefix, grid", [
    ("vit", "blocks.1.norm1", 1, (4, 4)),     # pytorch-grad-cam's recommendation, blocks[-1].norm1
    ("vit", "blocks.0", 1, (4, 4)),           # its input, multisal's default
    ("deit", "blocks.1.norm1", 2, (4, 4)),    # distilled: class and distillation tokens
    ("swin", "layers.3.blocks.0.norm2", 0, (2, 2)),   # its Swin tutorial's layer, tokens (N, h*w, C)
    ("swin", "norm", None, (2, 2)),           # channels-last (N, h, w, C): the transform is a transpose
])
def test_gradcam_equals_pytorch_grad_cams_with_its_reshape_transform(name, layer, prefix, grid, torch_backends):
    net, be = torch_backends(name)
    size = MODELS[name][1]
    x = _inputs(size)
    transform = (lambda t: t.permute(0, 3, 1, 2)) if prefix is None else _tokens_to_maps(prefix, *grid)
    with GradCAM(model=net, target_layers=[net.get_submodule(layer)], reshape_transform=transform) as cam:
        expected = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(int(t)) for t in TARGETS])
    raw = ms.gradcam(be, x, target=TARGETS, layer=layer, upsample=False, normalize=False)
    # pytorch-grad-cam scales each map to [0, 1], resizes it and scales it again (multisal resizes, then
    # scales): given its post-processing, the maps themselves must agree.
    assert_agree(scale_cam_image(scale_cam_image(raw, (size, size))), expected)


def test_ablationcam_on_tokens_zeroes_the_grid_tokens_and_keeps_the_prefix():
    net = narrow_vit()
    be = ms.load_backend("torch", model=net)
    x = _inputs(64)
    layer = net.blocks[0]
    xt = torch.from_numpy(x)
    seen = []
    with torch.no_grad():
        handle = layer.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
        score = net(xt)[np.arange(2), TARGETS].double()
        handle.remove()
        clean = seen[0]
        channels = clean.shape[2]
        weights = np.zeros((2, channels))
        for k in range(channels):
            def zero_channel(_module, _inputs, output, k=k):
                output = output.clone()
                output[:, 1:, k] = 0
                return output
            handle = layer.register_forward_hook(zero_channel)
            ablated = net(xt)[np.arange(2), TARGETS].double()
            handle.remove()
            weights[:, k] = ((score - ablated) / score).numpy()
    maps = clean[:, 1:, :].double().numpy().reshape(2, 4, 4, channels)
    expected = np.maximum(np.einsum("nk,nhwk->nhw", weights, maps), 0)
    assert_agree(ms.ablationcam(be, x, target=TARGETS, upsample=False, normalize=False), expected)


def _attention_and_gradients(net, x, targets):
    """Every block's attention probabilities (N, heads, T, T) and their gradients for the targets'
    logits, float64, read with hooks on timm's attn_drop in a float64 copy with fused attention off."""
    net = copy.deepcopy(net).double()
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    saved = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        saved.append(output)
    handles = [block.attn.attn_drop.register_forward_hook(keep) for block in net.blocks]
    logits = net(torch.from_numpy(x).double())
    logits[np.arange(len(x)), targets].sum().backward()
    for handle in handles:
        handle.remove()
    return [a.detach().numpy() for a in saved], [a.grad.numpy() for a in saved]


def _rollout_reference(attention, prefix, grid, fuse=np.mean):
    """Abnar and Zuidema 2020: R = prod_l (fuse_h A_l + I) / rowsum, the class token's row over the patches."""
    maps = []
    for i in range(len(attention[0])):
        tokens = attention[0].shape[-1]
        joint = np.eye(tokens)
        for a in attention:
            mixed = fuse(a[i], axis=0) + np.eye(tokens)
            joint = (mixed / mixed.sum(axis=1, keepdims=True)) @ joint
        maps.append(joint[0, prefix:].reshape(grid))
    return np.array(maps)


def _chefer_reference(attention, gradients, prefix, grid):
    """Chefer, Gur and Wolf 2021, eqs. 13-14 with A as the relevance: C = prod_l (I + mean_h (dA * A)^+)."""
    maps = []
    for i in range(len(attention[0])):
        tokens = attention[0].shape[-1]
        joint = np.eye(tokens)
        for a, g in zip(attention, gradients):
            joint = (np.eye(tokens) + np.clip(g[i] * a[i], 0, None).mean(axis=0)) @ joint
        maps.append(joint[0, prefix:].reshape(grid))
    return np.array(maps)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("name, prefix", [("vit", 1), ("deit", 2)])
def test_attention_methods_equal_the_papers_formulas(name, prefix, backend, torch_backends, onnx_backends):
    net, bt = torch_backends(name)
    be = bt if backend == "torch" else onnx_backends(name)
    x = _inputs(64)
    attention, gradients = _attention_and_gradients(net, x, TARGETS)
    assert len(be.attention_layers((3, 64, 64))) == len(net.blocks)
    raw = {"upsample": False, "normalize": False}
    assert_agree(ms.attention_rollout(be, x, **raw), _rollout_reference(attention, prefix, (4, 4)))
    assert_agree(ms.attention_rollout(be, x, head_fusion="max", **raw),
                 _rollout_reference(attention, prefix, (4, 4), np.max))
    assert_agree(ms.transformer_attribution(be, x, target=TARGETS, **raw),
                 _chefer_reference(attention, gradients, prefix, (4, 4)))
    assert ms.attention_rollout(be, x, discard_ratio=0.5).shape == (2, 64, 64)
    assert _fused(net) == FUSED[name] and all(FUSED[name])


def test_layout_overrides_and_their_errors(torch_backends):
    _, be = torch_backends("vit")
    x = _inputs(64)
    default = ms.gradcam(be, x, target=TARGETS)
    np.testing.assert_array_equal(ms.gradcam(be, x, target=TARGETS, layer="blocks.0", layout="tokens", prefix_tokens=1,
                                             token_grid=(4, 4)), default)
    # One grid row of 16 tokens is another reading of the same tokens, and a legitimate one.
    assert ms.gradcam(be, x, target=TARGETS, token_grid=(1, 16), upsample=False).shape == (2, 1, 16)
    for kwargs, message in [
        ({"layout": "nchw"}, "layer 'blocks.0' gives an activation of shape (2, 17, 192); layout='nchw' needs a 4-D"),
        ({"prefix_tokens": 3}, "layer 'blocks.0' has 17 tokens, which after 3 prefix tokens fit no grid of a 64x64"),
        ({"token_grid": (5, 5)}, "layer 'blocks.0' has 17 tokens, which do not fit token_grid=(5, 5)"),
        ({"layer": "blocks.1.attn.k_norm"}, "layer 'blocks.1.attn.k_norm' gives an activation of shape (2, 3, 17, 64); "
                                            "a CAM needs a 4-D (N,C,H,W) or (N,H,W,C) one or tokens"),
    ]:
        with pytest.raises(ms.MultisalError) as info:
            ms.gradcam(be, x, target=TARGETS, **kwargs)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ms.MultisalError, match="layer 'head' gives an activation of shape \\(2, 10\\); attention"):
        ms.attention_rollout(be, x, layers=["head"])


def test_multisal_layers_shows_each_candidates_layout_and_the_attention_layers(capsys):
    assert main(["layers", "timm_models:vit", "--shape", "3", "64", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line for line in lines}
    assert "tokens 1+4x4" in by_name["blocks.0"] and "(default)" in by_name["blocks.0"]
    assert "patch_embed.proj" in by_name and "nchw 4x4" in by_name["patch_embed.proj"]
    assert "blocks.0.attn.k_norm" not in by_name
    assert by_name["blocks.1.attn.attn_drop"].split()[-1] == "attention"


def test_a_wide_input_gives_a_wide_token_grid():
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=(32, 64), depth=2)
    be = ms.load_backend("torch", model=net.eval())
    shape = (3, 32, 64)
    assert be.layer_layouts(shape)[be.default_layer(shape)].describe() == "tokens 1+2x4"
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    assert ms.gradcam(be, x, target=TARGETS, upsample=False).shape == (2, 2, 4)
    assert ms.attention_rollout(be, x, upsample=False).shape == (2, 2, 4)
