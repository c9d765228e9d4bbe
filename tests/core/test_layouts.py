"""Layer layouts (multisal.layouts): recognition from shapes, the conversion to feature maps and
back, the overrides and their one-line errors. NumPy only; the timm models are in
tests/backends/torch/test_transformers.py."""
import numpy as np
import pytest

import multisal as ms
from multisal.layouts import LayerRecord, Layout, default_layer, recognise, recognise_layers, resolve_layout


@pytest.mark.parametrize("shape, input_hw, expected", [
    ((64, 16, 16), (64, 64), Layout("nchw", (16, 16))),
    ((16, 16, 96), (64, 64), Layout("nhwc", (16, 16))),           # Swin's channels-last stages
    ((768, 2, 2), (64, 64), Layout("nchw", (2, 2))),
    ((2, 2, 768), (64, 64), Layout("nhwc", (2, 2))),
    ((32, 147, 147), (299, 299), Layout("nchw", (147, 147))),    # Inception's valid convolutions
    ((8, 16, 32), (64, 128), Layout("nchw", (16, 32))),          # a wide input
    ((17, 192), (64, 64), Layout("tokens", (4, 4), 1)),          # ViT: class token + 4x4 patches
    ((197, 768), (224, 224), Layout("tokens", (14, 14), 1)),
    ((18, 192), (64, 64), Layout("tokens", (4, 4), 2)),          # DeiT distilled: class + distillation
    ((21, 192), (64, 64), Layout("tokens", (4, 4), 5)),          # 4 register tokens
    ((32, 64), (64, 128), Layout("tokens", (4, 8), 0)),          # Mixer on a wide input, no prefix
    ((3, 17, 64), (64, 64), None),                               # (heads, T, d): no grid
    ((200, 8), (64, 64), None),                                  # 200 - p is no 64x64 grid at one stride
])
def test_recognise_from_the_shape_alone(shape, input_hw, expected):
    assert recognise(shape, input_hw) == expected


def test_recognise_uses_the_layers_before_and_the_backends_hint():
    # 9 tokens on a 2x2 patch grid: 3x3 alone would win (prefix 0); the patch embedding says 2x2 + 5.
    assert recognise((9, 8), (64, 64)) == Layout("tokens", (3, 3), 0)
    assert recognise((9, 8), (64, 64), grids=[(2, 2)]) == Layout("tokens", (2, 2), 5)
    # (16, 16, 16) reads both ways: NCHW unless the backend knows it is channels-last.
    assert recognise((16, 16, 16), (64, 64)).kind == "nchw"
    assert recognise((16, 16, 16), (64, 64), hint="nhwc").kind == "nhwc"


def _vit_records():
    """A ViT's layers at 64x64 (patch 16, 2 blocks), as a backend describes them."""
    records = [LayerRecord("patch_embed.proj", (192, 4, 4)), LayerRecord("pos_drop", (17, 192))]
    for b in range(2):
        prev = "pos_drop" if b == 0 else f"blocks.{b - 1}"
        records += [LayerRecord(f"blocks.{b}.norm1", (17, 192), "norm", prev),
                    LayerRecord(f"blocks.{b}.attn.qkv", (17, 576)),
                    LayerRecord(f"blocks.{b}.attn.k_norm", (3, 17, 64)),
                    LayerRecord(f"blocks.{b}.attn.attn_drop", (3, 17, 17), "softmax"),
                    LayerRecord(f"blocks.{b}.norm2", (17, 192), "norm", f"blocks.{b}.attn"),
                    LayerRecord(f"blocks.{b}", (17, 192))]
    return records + [LayerRecord("norm", (17, 192), "norm", "blocks.1"), LayerRecord("head", (10,))]


def test_attention_internals_are_no_feature_maps_and_the_vit_default_is_the_last_norm1s_input():
    records = _vit_records()
    layouts = recognise_layers(records, (64, 64))
    assert not {"blocks.0.attn.k_norm", "blocks.0.attn.attn_drop", "head"} & set(layouts)
    assert layouts["blocks.1"] == Layout("tokens", (4, 4), 1)
    assert default_layer(records, layouts) == "blocks.0"            # the input of blocks.1.norm1
    # Without attention (an MLP-Mixer) or without prefix tokens, the last feature maps are the default.
    plain = [r for r in records if r.kind != "softmax"]
    assert default_layer(plain, recognise_layers(plain, (64, 64))) == "norm"


def test_maps_and_back_match_the_reshape_written_out():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 2 + 3 * 4, 5))
    form = Layout("tokens", (3, 4), 2)
    maps = form.to_maps(tokens)
    # pytorch-grad-cam's reshape_transform: drop the prefix, (N, h, w, C), channels to the front.
    expected = tokens[:, 2:, :].reshape(2, 3, 4, 5).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(maps, expected)
    assert maps[1, 4, 2, 3] == tokens[1, 2 + 2 * 4 + 3, 4]           # row-major patches
    back = form.from_maps(maps * 0 + 7, tokens)
    np.testing.assert_array_equal(back[:, :2], tokens[:, :2])      # prefix tokens kept
    assert (back[:, 2:] == 7).all()
    nhwc = rng.standard_normal((2, 3, 4, 5))
    form = Layout("nhwc", (3, 4))
    np.testing.assert_array_equal(form.to_maps(nhwc), nhwc.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(form.from_maps(form.to_maps(nhwc), nhwc), nhwc)
    assert Layout("tokens", (14, 14), 1).describe() == "tokens 1+14x14" and Layout("nhwc", (7, 7)).describe() == "nhwc 7x7"


def test_overrides():
    assert resolve_layout("l", (2, 17, 192), (64, 64), layout="tokens", prefix_tokens=1) == Layout("tokens", (4, 4), 1)
    assert resolve_layout("l", (2, 17, 192), (64, 64), token_grid=(2, 8)) == Layout("tokens", (2, 8), 1)
    assert resolve_layout("l", (2, 16, 16, 16), (64, 64), layout="nhwc") == Layout("nhwc", (16, 16))
    known = Layout("nchw", (16, 16))
    assert resolve_layout("l", (2, 16, 16, 16), (64, 64), known) is known


@pytest.mark.parametrize("shape, kwargs, message", [
    ((2, 17, 192), {"layout": "nchw"}, "layer 'blocks.3' gives an activation of shape (2, 17, 192); layout='nchw' "
                                       "needs a 4-D (N,C,H,W) one"),
    ((2, 8, 4, 4), {"layout": "tokens"}, "layer 'blocks.3' gives an activation of shape (2, 8, 4, 4); layout='tokens' "
                                         "needs a 3-D (N,T,C) one"),
    ((2, 8, 4, 4), {"layout": "NCHW"}, "layer 'blocks.3': layout='NCHW' is not one of 'nchw', 'nhwc', 'tokens'"),
    ((2, 8, 4, 4), {"prefix_tokens": 1}, "layer 'blocks.3' gives an activation of shape (2, 8, 4, 4); "
                                         "layout='tokens' needs a 3-D"),
    ((2, 8, 4, 4), {"layout": "nchw", "token_grid": (2, 2)}, "layer 'blocks.3': prefix_tokens and token_grid go with "
                                                            "layout='tokens', not 'nchw'"),
    ((2, 200, 8), {}, "layer 'blocks.3' has 200 tokens, which fit no grid of a 64x64 input: expected T = prefix"),
    ((2, 17, 8), {"prefix_tokens": 3}, "layer 'blocks.3' has 17 tokens, which after 3 prefix tokens fit no grid"),
    ((2, 17, 8), {"prefix_tokens": 17}, "layer 'blocks.3': prefix_tokens=17 must be an integer 0..16"),
    ((2, 17, 8), {"token_grid": (4, 5)}, "layer 'blocks.3' has 17 tokens, which do not fit token_grid=(4, 5)"),
    ((2, 17, 8), {"token_grid": (4, 4), "prefix_tokens": 2}, "do not fit token_grid=(4, 4) after 2 prefix tokens"),
    ((2, 17, 8), {"token_grid": "4x4"}, "token_grid='4x4' must be (rows, columns)"),
    ((2, 10), {}, "layer 'blocks.3' gives an activation of shape (2, 10); a CAM needs a 4-D (N,C,H,W) or (N,H,W,C)"),
])
def test_impossible_overrides_and_token_counts_are_one_line(shape, kwargs, message):
    with pytest.raises(ms.MultisalError) as info:
        resolve_layout("blocks.3", shape, (64, 64), **kwargs)
    text = str(info.value)
    assert message in text and "\n" not in text, text
