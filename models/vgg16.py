"""VGG16 in Chainer's layout (chainer.links.VGG16Layers), plus weight loaders.

Layer names and outputs follow Chainer, so a saliency target such as
"conv5_3" means exactly what it means in Chainer code:
  * conv1_1 .. conv5_3 output relu(conv(h)) -- Chainer names a conv layer's
    output after its ReLU, so the ReLU lives inside the conv module;
  * fc6, fc7 output dropout(relu(linear(h))) (dropout is a no-op in eval);
  * fc8 outputs raw logits (the softmax "prob" is left to the objectives);
  * pool1 .. pool5 are 2x2/2 max-pools with Chainer's cover_all=True, which
    for kernel = stride = 2 is PyTorch's ceil_mode=True (same on even sizes).
No in-place ops, so hooked activations stay intact.

Weights come from a Chainer .npz (keys "conv1_1/W", "conv1_1/b", ..., as
written by chainer.serializers.save_npz), a torchvision vgg16 state dict, or a
state dict already in this layout.
"""

import os
import zipfile
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multisal.errors import MultisalError

# (name, in channels, out channels) of the 13 conv layers, in order.
CONV_LAYERS = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)
# A max-pool follows the last conv of each stage (Chainer's pool1..pool5).
POOL_AFTER = {"conv1_2": "pool1", "conv2_2": "pool2", "conv3_3": "pool3",
              "conv4_3": "pool4", "conv5_3": "pool5"}
FC_LAYERS = (("fc6", 512 * 7 * 7, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000))
LAYER_NAMES = tuple(n for n, _, _ in CONV_LAYERS) + tuple(n for n, _, _ in FC_LAYERS)

# The last conv layer's output (the Grad-CAM paper's layer for VGG16). Note that the rule for
# layer=None (Backend.default_layer), the last 4-D activation with spatial size > 1, gives
# "pool5" (7x7) on every backend, as Chainer's VGG16Layers names it; name "conv5_3" to get this one.
CAM_LAYER = "conv5_3"

# torchvision.models.vgg16 indices of the same layers (features.N / classifier.N).
TORCHVISION_NAMES = dict(zip(
    [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    + [f"classifier.{i}" for i in (0, 3, 6)],
    LAYER_NAMES))


class ConvReLU(nn.Conv2d):
    """3x3 conv whose output is already relu'd, like Chainer's named conv output."""

    def forward(self, x):
        return F.relu(super().forward(x))


class LinearReLU(nn.Linear):
    """fc6/fc7: relu then dropout inside the module, like Chainer's fc6/fc7 output."""

    def __init__(self, in_features, out_features, dropout=0.5):
        super().__init__(in_features, out_features)
        self.dropout = dropout

    def forward(self, x):
        return F.dropout(F.relu(super().forward(x)), self.dropout, self.training)


class VGG16Chainer(nn.Module):
    def __init__(self):
        super().__init__()
        for name, cin, cout in CONV_LAYERS:
            self.add_module(name, ConvReLU(cin, cout, 3, padding=1))
            if name in POOL_AFTER:
                self.add_module(POOL_AFTER[name], nn.MaxPool2d(2, 2, ceil_mode=True))
        self.fc6 = LinearReLU(512 * 7 * 7, 4096)
        self.fc7 = LinearReLU(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)

    def forward(self, x):
        h = x
        for name, _, _ in CONV_LAYERS:
            h = getattr(self, name)(h)
            if name in POOL_AFTER:
                h = getattr(self, POOL_AFTER[name])(h)
        # Chainer's Linear flattens (N, 512, 7, 7) in C order, as torch.flatten does.
        h = torch.flatten(h, 1)
        return self.fc8(self.fc7(self.fc6(h)))


# --------------------------------------------------------------------------- loaders

def _load_ours(model, tensors, source, file_keys=None, owned=True):
    """Load {our key: array} after checking every key and shape.

    `file_keys` maps our key -> the key as spelled in the file, so a one-line
    error names what the user can look for in their file. A model built on the
    meta device (no wasted random init of 138M parameters) takes the tensors
    themselves; `owned=False` (the caller's own dict) copies them first.
    """
    file_keys = file_keys or {}
    on_meta = any(p.is_meta for p in model.parameters())
    state = {}
    for key, param in model.state_dict().items():
        shown = file_keys.get(key, key)
        if key not in tensors:
            raise MultisalError(f"VGG16 weights {source}: missing key {shown!r} "
                                f"(expected shape {tuple(param.shape)})")
        value = torch.as_tensor(tensors[key], dtype=torch.float32).contiguous()
        if value.shape != param.shape:
            raise MultisalError(f"VGG16 weights {source}: key {shown!r} has shape {tuple(value.shape)}, "
                                f"expected {tuple(param.shape)}")
        state[key] = value if owned or not on_meta else value.clone()
    extra = sorted(set(tensors) - set(state))
    if extra:
        raise MultisalError(f"VGG16 weights {source}: unexpected key {file_keys.get(extra[0], extra[0])!r} "
                            f"(expected only the weights and biases of {', '.join(LAYER_NAMES)})")
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def short_reason(err, limit=160):
    """First line of an exception, cut short: framework messages can run to pages."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_file(path):
    if not os.path.isfile(path):
        raise MultisalError(f"VGG16 weights file not found: {str(path)!r}")


def load_chainer_npz(model, path):
    """Load a chainer.links.VGG16Layers .npz ("conv1_1/W", ..., "fc8/b") into `model`.

    Files saved from a parent link carry a prefix ("predictor/conv1_1/W",
    "/conv1_1/W"); the prefix in front of "conv1_1/W" is stripped from all keys.
    Chainer's W layouts ((out, in, kh, kw) and (out, in)) are PyTorch's.
    """
    _check_file(path)
    source = repr(str(path))
    if not zipfile.is_zipfile(path):  # an .npz is a zip of .npy files
        raise MultisalError(f"VGG16 weights {source} is not a Chainer .npz file (not a zip archive); "
                            f"expected keys conv1_1/W ... fc8/b")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several types for bad archives
        raise MultisalError(f"VGG16 weights {source} is not a Chainer .npz file ({short_reason(err)})") from None
    with npz:
        prefixes = {k[:-len("conv1_1/W")] for k in npz.files if k.endswith("conv1_1/W")}
        prefixes = sorted(p for p in prefixes if p == "" or p.endswith("/"))
        if len(prefixes) > 1:
            raise MultisalError(f"VGG16 weights {source}: several models in one file (key prefixes "
                                f"{prefixes}); expected one VGG16Layers")
        prefix = prefixes[0] if prefixes else ""
        file_keys = {f"{name}.{ours}": f"{prefix}{name}/{theirs}"
                     for name in LAYER_NAMES for ours, theirs in (("weight", "W"), ("bias", "b"))}
        tensors = {}
        for ours, theirs in file_keys.items():
            if theirs in npz.files:
                try:
                    tensors[ours] = npz[theirs]
                except ValueError as err:  # e.g. an object array, refused without pickle
                    raise MultisalError(f"VGG16 weights {source}: key {theirs!r} cannot be read: {err}") from None
    # Other keys in the file (e.g. a parent link's own parameters) are ignored.
    return _load_ours(model, tensors, source, file_keys)


def _read_state_dict(path_or_dict):
    """(state dict, description for messages, whether the tensors are ours to keep)
    from a mapping or a torch file."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "(state dict)", False
    _check_file(path_or_dict)
    source = repr(str(path_or_dict))
    with open(path_or_dict, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise MultisalError(f"VGG16 weights {source} is a single .npy array, expected a Chainer .npz "
                                f"or a PyTorch state dict")
    try:
        state = torch.load(path_or_dict, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MultisalError(f"VGG16 weights {source} is neither a Chainer .npz nor a PyTorch state dict "
                            f"(torch.load: {short_reason(err)})") from None
    if not isinstance(state, Mapping):
        raise MultisalError(f"VGG16 weights {source} holds a {type(state).__name__}, expected a state dict")
    return dict(state), source, True


def _from_torchvision(model, state, source, owned):
    file_keys = {f"{name}.{suffix}": f"{tv}.{suffix}"
                 for tv, name in TORCHVISION_NAMES.items() for suffix in ("weight", "bias")}
    tensors = {ours: state[theirs] for ours, theirs in file_keys.items() if theirs in state}
    # Only features/classifier layers exist in torchvision's vgg16; anything else is an error.
    extra = sorted(set(state) - set(file_keys.values()))
    if extra:
        raise MultisalError(f"VGG16 weights {source}: unexpected key {extra[0]!r} "
                            f"(expected a torchvision vgg16 state dict)")
    return _load_ours(model, tensors, source, file_keys, owned)


def load_torchvision_state_dict(model, path_or_dict):
    """Load a torchvision vgg16 state dict (features.N / classifier.N) into `model`."""
    return _from_torchvision(model, *_read_state_dict(path_or_dict))


def is_torchvision_state(state):
    return any(k.startswith(("features.", "classifier.")) for k in state)


def is_npz(path):
    """True for an .npz archive (a zip of .npy members); torch's zip files hold data.pkl etc."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def load_weights(model, weights):
    """Any supported VGG16 weights -> model: a Chainer .npz, or a torchvision or
    our-layout state dict (a mapping or a .pth/.pt file)."""
    if not isinstance(weights, Mapping):
        _check_file(weights)
        if str(weights).lower().endswith(".npz") or is_npz(weights):
            return load_chainer_npz(model, weights)
    state, source, owned = _read_state_dict(weights)
    if is_torchvision_state(state):
        return _from_torchvision(model, state, source, owned)
    return _load_ours(model, state, source, owned=owned)


def vgg16_chainer(weights):
    """VGG16 (Chainer layout) in eval mode with the given weights."""
    with torch.device("meta"):  # every parameter is replaced by the loaded weights
        model = VGG16Chainer()
    return load_weights(model, weights).eval()
