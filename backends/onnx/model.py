"""An ONNX model made ready for differentiation: read safely, checked, and given a batch axis.

`prepare_model` is the one way in, for the backend and for `export_gradient_graph` alike:
- an .onnx file is read with its external data taken only from inside the model's own folder;
- onnx.checker validates it;
- a model exported with a fixed batch of 1 is rewritten to take any batch (batch.py: the constants
  that say 1 for the batch, followed through the graph), and the rewrite is kept only where a
  check shows it sound: on a batch of 2 the rewritten model gives the same output
  shapes and values as the original one image at a time. Otherwise the model keeps its batch of
  1, and the backend (and the exported gradient graph) run one image per call.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multisal import models
from multisal.errors import MultisalError
from multisal.files import write_atomic
from multisal.frameworks import lazy_import

from . import runtime
from .batch import free_batch
from .grad.builder import graph_input
from .grad.context import FLOAT_TYPES

onnx = lazy_import("onnx")
helper = lazy_import("onnx.helper")
torch = lazy_import("torch")


@dataclass
class PreparedModel:
    model: object            # onnx.ModelProto, batch axis free where the rewrite was sound
    source: str              # how errors name it: the file's path or "<ModelProto>"
    input_name: str
    input_dims: list         # the declared input shape, None for free axes (before any rewrite)
    batch_one: bool          # still a fixed batch of 1: run one image per call

    @property
    def sample_shape(self):
        return tuple(self.input_dims[1:])


def prepare_model(model) -> PreparedModel:
    """A path to an .onnx file or an onnx.ModelProto, ready for gradient graphs."""
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        model = load_model(model)
    elif isinstance(model, onnx.ModelProto):
        source = "<ModelProto>"
        check_model(model, source)
    else:
        raise MultisalError(f"the onnx backend needs a path to an .onnx file or an onnx.ModelProto, "
                            f"got {type(model).__name__}")
    inp = graph_input(model)
    if inp.type.tensor_type.elem_type not in FLOAT_TYPES:
        kind = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        raise MultisalError(f"ONNX model {source!r}: its input {inp.name!r} is {kind}; multisal explains models "
                            "whose image input is float (float32, float16 or float64)")
    dims = static_dims(inp)
    batch_one = dims[:1] == [1]
    if batch_one:
        rewritten = free_batch(model)
        if rewritten is not None and same_outputs(model, rewritten, inp.name, dims):
            model, batch_one = rewritten, False
    return PreparedModel(model, source, inp.name, dims, batch_one)


def load_model(path):
    """Read an .onnx file safely: external data only from inside the model's own folder."""
    path = Path(path)
    if not path.is_file():
        raise MultisalError(f"ONNX model {str(path)!r} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise MultisalError(f"cannot read ONNX model {str(path)!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    folder = path.parent.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if folder not in target.parents or not target.is_file():
            raise MultisalError(f"ONNX model {str(path)!r}: tensor {tensor.name!r} points at external data "
                                f"{location!r} outside the model's folder (or missing); refused")
    try:
        onnx.load_external_data_for_model(model, str(folder))
    except (ValueError, OSError) as err:   # data shorter than its tensor, a negative offset, ...
        raise MultisalError(f"ONNX model {str(path)!r}: cannot read its external data: "
                            f"{' '.join(str(err).split())}") from None
    check_model(model, str(path))
    return model


def check_model(model, source):
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MultisalError(f"ONNX model {source!r} is not valid: {reason}") from None


def static_dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def same_outputs(original, rewritten, input_name, dims) -> bool:
    """Does the batch-free rewrite give, on a batch of 2, what the original gives one by one: the
    same shapes first (allclose alone would broadcast a (1, k) output against (2, k)), then values?"""
    try:
        shape = [d or 8 for d in dims[1:]]
        dtype = helper.tensor_dtype_to_np_dtype(graph_input(original).type.tensor_type.elem_type)
        x = np.random.default_rng(0).standard_normal((2, *shape)).astype(dtype)
        one = runtime.session(original.SerializeToString(), "the model")
        two = runtime.session(rewritten.SerializeToString(), "the model")
        batched = runtime.run(two, {input_name: x}, "the model")
        singles = [runtime.run(one, {input_name: x[i:i + 1]}, "the model") for i in range(2)]
        for k, b in enumerate(batched):
            expected = np.concatenate([s[k] for s in singles])
            # float16 outputs hold 3 significant digits: ten of their steps, else float32's bound.
            eps = float(np.finfo(b.dtype).eps) if b.dtype.kind == "f" else 0.0
            rtol, atol = (10 * eps, 10 * eps) if eps > 1e-4 else (1e-4, 1e-5)
            if np.shape(b) != expected.shape or not np.allclose(b, expected, rtol=rtol, atol=atol):
                return False
        return True
    except MultisalError:   # any failure of the rewritten graph means: keep looping one by one
        return False


def exported_model(name, weights=None, cache_dir=None, sample_shape=(3, 224, 224)):
    """Path of models/ name `name` exported to ONNX (free batch axis, torch's default exporter),
    exported once and cached under ~/.cache/multisal/models, keyed by the name, the input size
    and the weights file's content."""
    key = hashlib.sha256(f"{name}|{tuple(sample_shape)}".encode())
    if weights is not None and not isinstance(weights, dict):
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                key.update(block)
    base = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                     "multisal", "models")
    path = Path(base) / f"{name}-{key.hexdigest()[:16]}.onnx"
    if not path.is_file():
        net = models.load(name, weights)
        path.parent.mkdir(parents=True, exist_ok=True)
        program = torch.onnx.export(net, (torch.zeros(1, *sample_shape),), None, dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},),
                                    verbose=False)
        write_atomic(path, program.model_proto.SerializeToString())
    return path
