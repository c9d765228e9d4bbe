"""The seam between methods and frameworks, declared and checked in one place.

A backend answers one question for a batch: given inputs x (N,C,H,W float32, already in model
space), an objective and a target, and a list of layer names, return the outputs, d objective / d x
(if asked) and, per layer, the activation A and d objective / d A. Methods only ever see NumPy.

Every backend must:
- run one forward pass per call (the objective lives inside the same pass),
- stop the backward pass where nothing asked for lies further down (Grad-CAM asks for no input
  gradient, so nothing below its layer is differentiated),
- never compute parameter gradients.

One more request is forward-only: `run(x, replace={layer: array})` gives the outputs of a pass in
which each named layer's output is the array given instead of what the layer computed (one row per
input). Ablation-CAM asks for it, to see the score with one feature map zeroed. A backend that
can do this implements `_run_replaced`; the others refuse in one line.

One more member makes a new backend: `randomized(layers, seed)` returns a backend of the same
kind over a copy of the model whose named layers (from `parameter_layers()`) have random
parameters, the model itself untouched; the model-randomisation sanity check (multisal.evaluation)
asks for it. A backend that can implements `parameter_layers` and `_randomized`; the others refuse
in one line.

A subclass implements `_run`, `layer_names`, `candidate_layers`, `sample_bytes` and, where its
models declare one, `sample_shape` (and `_run_replaced` where it can, `layer_records` where it
can describe every layer); this class does the rest once for all of them: input checks, chunking
a batch by the memory budget, the layers' layouts and the default layer (multisal.layouts),
closest-name hints for unknown layers, and a check of every Result it returns. It also declares
what the registry, the configuration and the engines need to know (multisal.registry): its name,
the framework it imports and how to install it, its options (its __init__'s keywords), how it
opens a model from a configuration and how a worker sets its thread count.
"""
from __future__ import annotations

import difflib
import inspect
import json
import typing
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from .errors import MissingFrameworkError, MultisalError
from .frameworks import available
from .layouts import LayerRecord, attention_layers, default_layer, recognise_layers, resolve_layout
from .modelspec import call_factory, model_kind
from .objectives import Detections, check_objective, check_target, target_rows

# A call never carries more samples than this, whatever the budget.
MAX_BATCH = 256
# The most samples a method's batch_size may ask for in one call (the configuration's bound too).
MAX_SAMPLES_PER_CALL = 4096


@dataclass
class Result:
    outputs: np.ndarray                      # the model's output for the batch
    target: Optional[np.ndarray] = None      # class index used per sample (None for regions / no objective)
    input_grad: Optional[np.ndarray] = None  # d objective / d x, (N,C,H,W)
    activations: Dict[str, np.ndarray] = field(default_factory=dict)
    gradients: Dict[str, np.ndarray] = field(default_factory=dict)


class ByteSize(str):
    """The type of an option that holds a memory size: a number of bytes, or a string such as
    "2GiB" (parse_bytes reads both)."""


class Backend:
    """Base class of the adapters (see the module docstring for what a subclass provides)."""

    #: The name the registry, `load_backend` and the configuration's `backend` key use; it is
    #: also the name of the backend's table of options in a configuration file.
    name = "base"
    #: The module (or modules) that must be importable for this backend to work, and how to install it.
    framework = None
    install = ""
    #: Model files this backend opens from a configuration: suffix -> how errors call them.
    model_files: Dict[str, str] = {}
    #: Whether a configuration's models/ names (multisal.models) run on this backend.
    opens_model_names = True

    #: What a `device` option may be, for the error when the framework cannot use one.
    devices = "'cpu'"

    preset = None          # the preset its inputs use (set by config-driven loading)
    memory_budget = 1 << 30

    # ---- what a subclass implements ------------------------------------------------------------
    def _run(self, x, objective, target, layers, input_grad) -> Result:
        raise NotImplementedError

    def _run_replaced(self, x, replace) -> Result:
        """One forward pass over x in which the output of each layer named in `replace` is
        replace[layer] (float, one row per input) instead of what the layer computes; Result.outputs
        only. The backend checks the names (as it spells them) and the shapes against its layers.
        Backends that cannot do this leave it as it is."""
        raise NotImplementedError

    def parameter_layers(self) -> list:
        """The layers `randomized` can randomise (those with parameters), in forward order."""
        self.check_randomizes()
        return []

    def _randomized(self, layers, seed) -> "Backend":
        """A new backend over a copy of the model with these layers' parameters random (seeded),
        the layers checked against parameter_layers(). Backends that cannot leave it as it is."""
        raise NotImplementedError

    def layer_names(self) -> list:
        """Every layer name a call may ask for."""
        raise NotImplementedError

    def candidate_layers(self, sample_shape) -> list:
        """[(layer name, activation shape without the batch)] of the activations that are feature
        maps (NCHW, NHWC or tokens, multisal.layouts) with spatial size > 1 and feed the output,
        in execution order: the layers Grad-CAM can use. A backend that describes its layers
        (layer_records) gets them from its records' recognised layouts; one that does not lists them."""
        if type(self).layer_records is Backend.layer_records:
            raise NotImplementedError
        records, layouts = self._layouts(tuple(sample_shape))
        return [(r.name, r.shape) for r in records if r.name in layouts]

    def layer_records(self, sample_shape) -> list:
        """[multisal.layouts.LayerRecord] of the layers in execution order, for layout recognition.
        This default describes the candidate layers as NCHW, which is what a backend that does not
        describe its layers itself promises of them; the torch and onnx backends describe every
        layer (shape, normalisation or softmax, the layer it reads)."""
        return [LayerRecord(name, tuple(shape), hint="nchw") for name, shape in self.candidate_layers(sample_shape)]

    def sample_bytes(self, sample_shape) -> int:
        """Bytes one sample of this shape holds during a call (forward and backward)."""
        raise NotImplementedError

    @property
    def sample_shape(self):
        """The (C, H, W) the model declares (None for a free axis), or None if it declares none."""
        return None

    def _framework_device(self, device):
        """The framework's device object for a `device` option (None: the backend's default);
        raises whatever the framework raises for one it cannot use."""
        raise NotImplementedError

    # ---- done here for every backend --------------------------------------------------------------
    def run(self, x: np.ndarray, objective: Optional[str] = None, target=None,
            layers: Sequence[str] = (), input_grad: bool = False,
            replace: Optional[Mapping[str, np.ndarray]] = None) -> Result:
        """One pass over x. With objective None only outputs and activations are returned.

        target: an int64 array (N,), ARGMAX_PER_SAMPLE (chosen from this pass's output), a Region or
        Detections.
        replace: {layer: array with one row per input}: a forward-only pass (no objective, layers
        or input gradient) in which those layers output the arrays given (see the module docstring).
        """
        x = check_input(x)
        if replace is not None:
            return self._replaced(x, objective, layers, input_grad, replace)
        if objective is not None:
            check_objective(objective)
            target = check_target(target, len(x))
            if isinstance(target, Detections):
                target.check_input(x.shape)
        elif input_grad:
            raise MultisalError("an input gradient needs an objective")
        layers = list(layers)
        step = self.batch_size(x.shape[1:])
        if len(x) <= step:
            return self.check_result(self._run(x, objective, target, layers, input_grad), x, objective, layers,
                                     input_grad)
        # Too many inputs for the memory budget: run in chunks and stitch the results together.
        parts = []
        for start, stop in even_chunks(len(x), step):
            sl = slice(start, stop)
            part_target = target_rows(target, sl)
            parts.append(self.check_result(self._run(x[sl], objective, part_target, layers, input_grad), x[sl],
                                           objective, layers, input_grad))
        return concatenate_results(parts)

    @property
    def replaces_layers(self) -> bool:
        """Whether run(x, replace=...) works on this backend (its class implements _run_replaced)."""
        return type(self)._run_replaced is not Backend._run_replaced

    def check_replaces_layers(self) -> None:
        """One line naming this backend when run(..., replace=...) does not work on it."""
        if not self.replaces_layers:
            raise MultisalError(f"backend {self.name!r} cannot replace a layer's output in a forward pass "
                                "(run(..., replace=...)), which Ablation-CAM needs")

    def _replaced(self, x, objective, layers, input_grad, replace) -> Result:
        """run() with `replace`: checked here once, then run in chunks by the memory budget."""
        self.check_replaces_layers()
        if objective is not None or input_grad or list(layers):
            raise MultisalError("run(..., replace=...) is a forward pass only: give no objective, input_grad "
                                "or layers with it")
        if not isinstance(replace, Mapping) or not replace:
            raise MultisalError(f"replace must map layer names to arrays, got {replace!r}")
        values = {}
        for name, value in replace.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim == 0 \
                    or len(value) != len(x):
                raise MultisalError(f"replace[{name!r}] must be a float array with one row per input ({len(x)}), "
                                    f"got {getattr(value, 'shape', type(value).__name__)}")
            if not np.isfinite(value).all():   # else the outputs' check would blame the model
                raise MultisalError(f"replace[{name!r}] holds NaN or infinite values")
            values[name] = np.ascontiguousarray(value)
        parts = []
        for start, stop in even_chunks(len(x), self.batch_size(x.shape[1:])):
            part = self._run_replaced(x[start:stop], {k: v[start:stop] for k, v in values.items()})
            parts.append(self.check_result(part, x[start:stop], None, [], False))
        return parts[0] if len(parts) == 1 else concatenate_results(parts)

    @property
    def randomizes(self) -> bool:
        """Whether randomized() works on this backend (its class implements _randomized)."""
        return type(self)._randomized is not Backend._randomized

    def check_randomizes(self) -> None:
        """One line naming this backend when randomized() does not work on it."""
        if not self.randomizes:
            raise MultisalError(f"backend {self.name!r} cannot randomise its model's parameters (randomized(...)), "
                                "which the model-randomisation sanity check needs")

    def randomized(self, layers: Sequence[str], seed: int = 0) -> "Backend":
        """A new backend of this kind over a copy of the model in which each of `layers` (names
        from parameter_layers()) has random parameters drawn from `seed`; this backend and its
        model are left as they are."""
        self.check_randomizes()
        if isinstance(layers, str) or not list(layers):
            raise MultisalError(f"randomized() takes a non-empty list of layer names, got {layers!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise MultisalError(f"seed={seed!r}: expected an integer >= 0")
        known = self.parameter_layers()
        for name in layers:
            if name not in known:
                close = closest_names(name, known)
                hint = f"closest: {', '.join(close)}" if close else \
                    f"layers with parameters: {', '.join(known[:12])}{', ...' if len(known) > 12 else ''}"
                raise MultisalError(f"layer {name!r} of {self.describe()} has no parameters to randomise: {hint}")
        return self._randomized(list(layers), int(seed))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs only (no backward)."""
        return self.run(x).outputs

    def default_layer(self, sample_shape) -> str:
        """The layer a CAM reads by default: the last feature maps with spatial size > 1 that feed
        the output, or in a vision transformer the input of its last block's first norm
        (multisal.layouts.default_layer)."""
        key = tuple(sample_shape)
        cache = self.__dict__.setdefault("_default_layers", {})
        if key not in cache:
            records, layouts = self._layouts(key)
            name = default_layer(records, layouts)
            if name is None:
                raise MultisalError(f"{self.describe()} has no 4-D activation or token sequence on a grid with "
                                    "spatial size > 1: name a layer")
            cache[key] = name
        return cache[key]

    def _layouts(self, sample_shape):
        """(layer records, {name: Layout} of the feature-map layers) at this input shape, once."""
        key = tuple(sample_shape)
        cache = self.__dict__.setdefault("_layer_layouts", {})
        if key not in cache:
            records = self.layer_records(key)
            cache[key] = records, recognise_layers(records, key[1:])
        return cache[key]

    def layer_layouts(self, sample_shape) -> dict:
        """{layer: multisal.layouts.Layout} of the layers a CAM can read at this input shape, in
        execution order."""
        return dict(self._layouts(sample_shape)[1])

    def attention_layers(self, sample_shape) -> list:
        """The attention probabilities (softmax outputs (N, heads, T, T) over the model's token
        sequence) in execution order: the layers attention rollout reads."""
        records, layouts = self._layouts(sample_shape)
        return attention_layers(records, layouts)

    def layer_layout(self, layer, activation_shape, sample_shape, layout=None, prefix_tokens=None, token_grid=None):
        """The Layout of `layer`'s activation of `activation_shape` (batch first) for inputs of
        sample_shape: the recognised one, or what the overrides say (checked against the shape)."""
        _, layouts = self._layouts(sample_shape)
        grids = [found.grid for found in layouts.values()]
        return resolve_layout(layer, activation_shape, tuple(sample_shape)[1:], layouts.get(layer), layout, prefix_tokens,
                              token_grid, grids)

    def batch_size(self, sample_shape) -> int:
        """How many inputs of this shape one call carries: as many as the memory budget holds."""
        return max(1, min(MAX_BATCH, int(self.memory_budget) // max(1, int(self.sample_bytes(tuple(sample_shape))))))

    def resolve_device(self, device):
        """The framework's device for a `device` option, or one line naming the device and what it
        may be when the framework cannot use it."""
        try:
            return self._framework_device(device)
        except Exception as err:   # noqa: BLE001 - each framework raises its own types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise MultisalError(f"device {device!r} is not usable by {self.name}: {reason} "
                                f"(expected {self.devices})") from None

    def describe(self) -> str:
        """How errors name the model this backend runs."""
        model = getattr(self, "model", None)
        return type(model).__name__ if model is not None else self.name

    def unknown_layer(self, name) -> MultisalError:
        """The error for a layer the model does not have, naming the closest ones it has."""
        names = self.layer_names()
        close = closest_names(name, names)
        if close:
            hint = f"closest: {', '.join(close)}"
        elif names:
            hint = f"available: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
        else:
            hint = "this model has no named layers"
        return MultisalError(f"unknown layer {name!r} in {self.describe()}: {hint}")

    def check_layers(self, layers) -> None:
        known = set(self.layer_names())
        for name in layers:
            if name not in known:
                raise self.unknown_layer(name)

    def check_result(self, result, x, objective, layers, input_grad) -> Result:
        """The Result of one _run, checked against the seam: a violation names the backend and the
        field. Non-finite values are the model's (a NaN weight, an overflow) and say so."""
        n = len(x)

        def fail(what):
            raise MultisalError(f"backend {self.name!r}: {what}")

        def check_array(label, value, shape=None):
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                fail(f"{label} must be a float numpy array, got "
                     f"{getattr(value, 'dtype', type(value).__name__)}")
            if value.ndim == 0 or value.shape[0] != n:
                fail(f"{label} has shape {value.shape}, expected {n} samples along its first axis")
            if shape is not None and value.shape != tuple(shape):
                fail(f"{label} has shape {value.shape}, expected {tuple(shape)}")
            if not np.isfinite(value).all():
                fail(f"the model's {label} hold NaN or infinite values")

        if not isinstance(result, Result):
            fail(f"_run returned {type(result).__name__}, not a Result")
        check_array("outputs", result.outputs)
        if input_grad:
            if result.input_grad is None:
                fail("no input gradient, though one was asked for")
            check_array("input gradient", result.input_grad, x.shape)
        if set(result.activations) != set(layers):
            fail(f"activations for {sorted(result.activations)}, expected {sorted(layers)}")
        for name, value in result.activations.items():
            check_array(f"activation of layer {name!r}", value)
        if objective is not None and (layers or input_grad):
            if set(result.gradients) != set(layers):
                fail(f"gradients for {sorted(result.gradients)}, expected {sorted(layers)}")
            for name, value in result.gradients.items():
                check_array(f"gradient of layer {name!r}", value, result.activations[name].shape)
        return result

    # ---- what the registry, the configuration and the engines ask of a backend class -----------------
    @classmethod
    def options(cls) -> Dict[str, tuple]:
        """{option: (type, default)}: the keywords of __init__ after the model, less `preset` (which
        a configuration's `preset` key sets). A configuration's [<name>] table takes exactly these."""
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        out = {}
        for key, param in list(inspect.signature(cls.__init__).parameters.items())[2:]:
            if key == "preset" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            out[key] = (hints.get(key), None if param.default is param.empty else param.default)
        return out

    @classmethod
    def require_framework(cls) -> None:
        """Fail with one line naming what to install when the framework is missing."""
        names = (cls.framework,) if isinstance(cls.framework, str) else tuple(cls.framework or ())
        missing = [name for name in names if not available(name)]
        if missing:
            how = f": {cls.install}" if cls.install else ""
            raise MissingFrameworkError(f"backend {cls.name!r} needs {missing[0]}, which is not installed{how}")

    @classmethod
    def model_problem(cls, spec: str, weights=None) -> Optional[tuple]:
        """Why a configuration's `model` (and `weights`) cannot run on this backend, as
        (config key, reason), or None when it can. Called before anything is loaded."""
        kind = model_kind(spec)
        show = json.dumps
        if kind == "name" and not cls.opens_model_names:
            return "model", f"{show(spec)} is a models/ name, which backend {show(cls.name)} does not run"
        if kind not in ("name", "factory") and kind not in cls.model_files:
            return "backend", f"{show(cls.name)} cannot run model {show(spec)}"
        if weights is not None and kind in cls.model_files:
            return "weights", (f"{show(weights)} goes with a models/ name or \"package.module:factory\", not with "
                               f"model {show(spec)} (the file holds its weights)")
        return None

    @classmethod
    def open_model(cls, spec: str, weights=None, sample_shape=(3, 224, 224)):
        """What this backend's __init__ takes as `model`, from a configuration's `model` and
        `weights`. The base class opens "package.module:factory" (called with no arguments)."""
        if model_kind(spec) != "factory":
            raise MultisalError(f"model {spec!r}: backend {cls.name!r} opens only \"package.module:factory\"")
        if weights is not None:
            raise MultisalError(f"model {spec!r}: backend {cls.name!r} takes no weights file")
        return call_factory(spec)

    @classmethod
    def worker_options(cls, options: dict, threads: int, gpus: float) -> dict:
        """The options of a worker process (a Ray actor) with `threads` CPU threads and `gpus`
        GPUs: where a backend sets its thread count (per process, or per session as an option)."""
        return dict(options)


def closest_names(name, names, n=5) -> list:
    """Names like `name`: the same last component (a path under the wrong parent) first, then
    similar spellings."""
    names = list(names)
    last = str(name).replace("/", ".").rsplit(".", 1)[-1]
    same_leaf = [m for m in names if m.replace("/", ".").rsplit(".", 1)[-1] == last]
    return list(dict.fromkeys(same_leaf + difflib.get_close_matches(str(name), names, n=n, cutoff=0.4)))[:n]


def concatenate_results(parts) -> Result:
    def cat(values):
        return None if values[0] is None else np.concatenate(values)
    first = parts[0]
    return Result(
        outputs=cat([p.outputs for p in parts]),
        target=cat([p.target for p in parts]),
        input_grad=cat([p.input_grad for p in parts]),
        activations={k: cat([p.activations[k] for p in parts]) for k in first.activations},
        gradients={k: cat([p.gradients[k] for p in parts]) for k in first.gradients},
    )


def samples_per_call(be, batch_size, sample_shape) -> int:
    """A method's batch_size keyword as a number of samples per backend call: None for the
    backend's own batch at this input shape (Backend.batch_size), else an integer 1..MAX_SAMPLES_PER_CALL."""
    if batch_size is None:
        return be.batch_size(sample_shape)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or not 1 <= batch_size <= MAX_SAMPLES_PER_CALL:
        raise MultisalError(f"batch_size={batch_size!r} must be an integer 1..{MAX_SAMPLES_PER_CALL}, or None for "
                            "as many as the backend's memory budget holds")
    return int(batch_size)


def even_chunks(total: int, step: int):
    """[(start, stop), ...] covering range(total) in chunks of at most `step` whose sizes differ by at
    most one: 50 samples at 6 a batch run as 9 batches of 5-6, not 8 of 6 and a small, slow one of 2."""
    count = -(-total // max(1, int(step)))
    edges = [total * k // count for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def parse_bytes(budget) -> int:
    """A memory budget: bytes, or a string like '2GiB', '512MB'."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return int(budget)
    text = str(budget).strip().upper().replace("IB", "B")
    for suffix, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * scale)
            except ValueError:
                break
    raise MultisalError(f"memory_budget {budget!r} is not a size: expected bytes or a string like '2GiB'")


def check_input(x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise MultisalError(f"inputs must be a numpy array (N,C,H,W) float32, got {type(x).__name__}")
    if x.ndim != 4:
        raise MultisalError(f"inputs must have shape (N,C,H,W), got shape {x.shape}; "
                            "use a preset's apply() to turn images into model inputs")
    if len(x) == 0:
        raise MultisalError("inputs hold no image (shape (0, ...)): give at least one")
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise MultisalError(f"inputs must be float32, got dtype {x.dtype}; use a preset's apply()")
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise MultisalError("inputs contain NaN or infinite values")
    return np.ascontiguousarray(x)


def check_baseline(baseline, x) -> np.ndarray:
    """A method's baseline for inputs x (Integrated Gradients' path start, what Occlusion sets a
    window to): zeros for None, else a number or an array broadcast to x's shape (read-only)."""
    if baseline is None:
        return np.zeros_like(x)
    try:
        base = np.broadcast_to(np.asarray(baseline, np.float32), x.shape)
    except ValueError:
        raise MultisalError(f"baseline of shape {np.shape(baseline)} does not broadcast to the inputs' shape "
                            f"{x.shape}: give a number, one image (C,H,W) or one per input") from None
    if not np.isfinite(base).all():
        raise MultisalError("baseline contains NaN or infinite values")
    return base
