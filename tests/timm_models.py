"""Small timm architectures (random weights, pretrained=False, the fewest blocks the family allows
and small inputs) for the transformer tests, and factories "timm_models:vit" etc. for the command
line's "package.module:factory" models.

MODELS: name -> (factory, input size, how torch's TorchScript exporter exports it ("fused" as it
is, "unfused" with timm's fused attention switched off), the torch backend's default layer, its
layout as `multisal layers` shows it). The defaults are the ones a practitioner picks:
the input of the last block's norm1 on ViT-style models (blocks.0 here, with two blocks), the last
stage's output in its grid on hierarchical ones, the last feature maps on CNNs and on models that
pool all their tokens (Mixer, LeViT).
"""
import dataclasses

import timm
import torch
from timm.models import maxxvit


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def vit():
    return _create("vit_tiny_patch16_224", img_size=64, depth=2)


def narrow_vit():
    """A ViT of 24 channels, for the tests that run one pass per feature map."""
    return _create("vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=24)


def deit():
    return _create("deit_tiny_distilled_patch16_224", img_size=64, depth=2)


def beit():
    return _create("beit_base_patch16_224", img_size=64, depth=2)


def eva02():
    return _create("eva02_tiny_patch14_224", img_size=56, depth=2)


def swin():
    return _create("swin_tiny_patch4_window7_224", img_size=64, window_size=2, depths=(1, 1, 1, 1))


def swinv2():
    return _create("swinv2_tiny_window8_256", img_size=64, window_size=2, depths=(1, 1, 1, 1))


def maxvit():
    torch.manual_seed(0)
    cfg = dataclasses.replace(maxxvit.model_cfgs["maxvit_pico_rw"], depths=(1, 1, 1, 1))
    return maxxvit.MaxxVit(cfg, img_size=64, num_classes=10).eval()


def pvt_v2():
    return _create("pvt_v2_b0", depths=(1, 1, 1, 1))


def convnext():
    return _create("convnext_atto", depths=(1, 1, 1, 1))


def mixer():
    torch.manual_seed(0)
    net = timm.models.MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=128).eval()
    torch.nn.init.normal_(net.head.weight, std=0.02)   # timm starts Mixer's classifier at zero: no gradient at all
    return net


def levit():
    return _create("levit_128s", img_size=128, depth=(1, 1, 1))


MODELS = {
    "vit": (vit, 64, "fused", "blocks.0", "tokens 1+4x4"),
    "deit": (deit, 64, "fused", "blocks.0", "tokens 2+4x4"),
    # The dynamo exporter fails on BEiT and MaxViT (decomposing their FX graphs), and is 5-20 times
    # slower than the TorchScript one on the others.
    "beit": (beit, 64, "fused", "blocks.0", "tokens 1+4x4"),
    # The TorchScript exporter refuses EVA's fused call (scaled_dot_product_attention's is_causal a
    # tensor); the unfused one computes the same function.
    "eva02": (eva02, 56, "unfused", "blocks.0", "tokens 1+4x4"),
    "swin": (swin, 64, "fused", "norm", "nhwc 2x2"),
    "swinv2": (swinv2, 64, "fused", "norm", "nhwc 2x2"),
    "maxvit": (maxvit, 64, "fused", "norm", "nchw 2x2"),
    "pvt_v2": (pvt_v2, 64, "fused", "stages.3", "nchw 2x2"),
    "convnext": (convnext, 64, "fused", "stages.3.blocks.0", "nchw 2x2"),
    "mixer": (mixer, 64, "fused", "norm", "tokens 0+4x4"),
    "levit": (levit, 128, "fused", "stages.2.blocks.0", "tokens 0+2x2"),
}
