"""PyTorch autograd adapter for the backend seam.

One forward pass per call with the objective computed on its output, then one torch.autograd.grad
call whose inputs are exactly what was asked for: autograd then only walks the part of the graph
between the objective and those tensors, so Grad-CAM never differentiates below its layer.
Parameters are switched to requires_grad=False for the duration of a call, so no parameter
gradient is ever computed and the forward pass saves no tensors that only weight gradients need.

Models come from a configuration as a models/ name (multisal.models), "package.module:factory"
(an nn.Module; `weights` a state dict loaded with weights_only=True, so no code is unpickled) or a
TorchScript file (.pt/.pth from torch.jit.save).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Optional

import numpy as np

from multisal import models
from multisal.allocator import reuses_large_blocks
from multisal.backend import Backend, ByteSize, Result, parse_bytes
from multisal.errors import MultisalError
from multisal.frameworks import lazy_import
from multisal.layouts import LayerRecord
from multisal.modelspec import call_factory, model_kind
from multisal.objectives import objective_value
from multisal.registry import register_backend

from .fold import fold_batchnorm

torch = lazy_import("torch")

# Bytes of activations one call may hold (forward + backward) on the CPU. With glibc's malloc as it
# comes, a block above its mmap threshold (32 MiB at most) is unmapped when freed and faulted in
# again by the next call, so batches whose largest activation stays below it are fastest (1 GiB).
# Once ms.tune_malloc() has run, freed blocks are reused and larger batches spread each layer's
# fixed costs (2 GiB). The batch sizes these give and what they gain: README, "Use".
CPU_MEMORY_BUDGET = 1 << 30
CPU_MEMORY_BUDGET_TUNED_MALLOC = 2 << 30
# Folding BatchNorm changes float32 rounding only (README, "Use", says by how much), so a folded
# model further off than this from the model, in its outputs or its input gradient, is not the
# same function and is not used. The gradient's bound is wider: a ReLU kink that falls the other
# way moves a few of its elements (README, "Use", says by how much); a wrong fold is off by O(1).
_FOLD_TOLERANCE = 1e-4
_FOLD_GRADIENT_TOLERANCE = 3e-2
_FOLDED_VARIANTS = 4


@register_backend
class TorchBackend(Backend):
    name = "torch"
    framework = "torch"
    install = "pip install 'multisal[torch]'"
    model_files = {".pt": "a .pt/.pth file", ".pth": "a .pt/.pth file"}
    devices = "'cpu', 'cuda', 'cuda:0', 'mps' or 'auto'"

    def __init__(self, model, device: str = "cpu", memory_budget: Optional[ByteSize] = None, preset=None,
                 channels_last: Optional[bool] = None, fold_batchnorm: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise MultisalError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        self.device = self.resolve_device(device)
        # oneDNN's CPU convolutions (depthwise ones above all) run faster on NHWC (README, "Use").
        # The maths is unchanged.
        self.channels_last = self.device.type == "cpu" if channels_last is None else bool(channels_last)
        try:
            self.model = model.to(self.device).eval()
            if self.channels_last:
                self.model.to(memory_format=torch.channels_last)
        except (RuntimeError, ValueError) as err:   # uninitialised (lazy) parameters, a device out of memory
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise MultisalError(f"cannot put {type(model).__name__} on {self.device}: {reason[:300]}") from None
        self._memory_budget = parse_bytes(memory_budget) if memory_budget is not None else None
        self.preset = preset
        # BatchNorm folded into the conv before it (backends/torch/fold.py), one variant per set of
        # asked-for layers (they stay unfolded); None where the model cannot be folded.
        self.fold_batchnorm = bool(fold_batchnorm)
        self._folded = {}
        self._folded_convs = {}    # conv name -> the conv with its BatchNorm folded in, shared by the variants
        self._folded_from = None   # _weights_state() when they were folded
        self._modules = dict(self.model.named_modules())
        self._bytes_per_sample = {}

    @property
    def memory_budget(self):
        """The budget given, else the default: half the free GPU memory, or on the CPU one that
        depends on whether tune_malloc() has run (it may run after the backend is made)."""
        if self._memory_budget is not None:
            return self._memory_budget
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return free // 2
        return CPU_MEMORY_BUDGET_TUNED_MALLOC if reuses_large_blocks() else CPU_MEMORY_BUDGET

    def _framework_device(self, device):
        if device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("torch sees no CUDA device")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("torch sees no MPS device")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"torch has no {dev.type!r} device that runs a model")
        return dev

    # ---- from a configuration ------------------------------------------------------------------
    @classmethod
    def open_model(cls, spec, weights=None, sample_shape=(3, 224, 224)):
        kind = model_kind(spec)
        if kind == "name":
            return models.load(spec, weights)
        if kind in cls.model_files:
            return _torchscript(os.path.expanduser(spec))
        net = call_factory(spec)
        if not isinstance(net, torch.nn.Module):
            raise MultisalError(f"model {spec!r}: the factory returned {type(net).__name__}; the torch backend needs "
                                "an nn.Module")
        if weights is not None:
            try:
                net.load_state_dict(_state_dict(weights))
            except RuntimeError as err:
                raise MultisalError(f"weights {weights!r} do not fit {spec!r}: "
                                    f"{str(err).strip().splitlines()[-1].strip()}") from None
        return net

    @classmethod
    def worker_options(cls, options, threads, gpus):
        torch.set_num_threads(max(1, int(threads)))
        if gpus > 0:
            options = {"device": "cuda", **options}
        return dict(options)

    # ---- layers -------------------------------------------------------------------------------
    def layer_names(self):
        return [name for name in self._modules if name]

    def parameter_layers(self):
        """Modules that torch can re-initialise (those with reset_parameters: convolutions, linear
        and normalisation layers), in the order named_modules() gives them."""
        return [name for name, module in self.model.named_modules() if name and hasattr(module, "reset_parameters")]

    def _randomized(self, layers, seed):
        """A deep copy of the model with each layer's reset_parameters() called after
        torch.manual_seed(seed) (torch's own initialisation, as Quantus's MPRT draws it); the
        global random state is restored afterwards, the model's own parameters untouched."""
        model = copy.deepcopy(self.model)
        modules = dict(model.named_modules())
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for name in layers:
                torch.manual_seed(seed)
                modules[name].reset_parameters()
        # A randomised copy explains once or twice: tracing it to fold its BatchNorms would cost
        # more than folding saves, and its activations are the size of the model's.
        copy_backend = TorchBackend(model, device=str(self.device), memory_budget=self._memory_budget,
                                    preset=self.preset, channels_last=self.channels_last, fold_batchnorm=False)
        copy_backend._bytes_per_sample = dict(self._bytes_per_sample)
        return copy_backend

    def _module(self, name):
        if name not in self._modules or not name:
            raise self.unknown_layer(name)
        return self._modules[name]

    def _trace(self, sample_shape):
        """One forward pass on a single zero input, recording every module's output in order, with
        its version counter (which in-place ops bump) at that moment, and the module's first input."""
        seen = []
        handles = []

        def record(name):
            def hook(module, inputs, output):
                if isinstance(output, torch.Tensor):
                    first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
                    seen.append((name, output, output._version, module, first,
                                 None if first is None else first._version))
            return hook

        for name, module in self._modules.items():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        try:
            with torch.no_grad(), self._unfused_attention(), self._explained((1, *sample_shape)):
                out = self.model(torch.zeros((1, *sample_shape), device=self.device))
        finally:
            for h in handles:
                h.remove()
        return seen, out

    @contextmanager
    def _unfused_attention(self, layers=None):
        """timm's attention modules (those with a `fused_attn` switch) compute their probabilities
        inside F.scaled_dot_product_attention, where no hook sees them; with the switch off they
        pass them through their `attn_drop` module. Switched off for the call when one of `layers`
        (None: any) lies inside such a module, and put back as it was afterwards."""
        fused = [(name, m) for name, m in self._modules.items() if getattr(m, "fused_attn", False) is True]
        if layers is not None:
            fused = [(name, m) for name, m in fused if any(layer.startswith(f"{name}.") for layer in layers)]
        for _, m in fused:
            m.fused_attn = False
        try:
            yield
        finally:
            for _, m in fused:
                m.fused_attn = True

    @property
    def sample_shape(self):
        """A torch module declares no input size."""
        return None

    def layer_records(self, sample_shape):
        """Every module output of one sample (multisal.layouts.LayerRecord), in execution order: a
        tensor under the name of the first (innermost) module that returned it; a normalisation
        module's output is kind "norm", attention probabilities (a tensor (1, heads, T, T) >= 0
        whose rows sum to 1) kind "softmax". Tensors whose first axis is not the batch of 1 (Swin's
        windows) are left out."""
        seen, _ = self._trace(tuple(sample_shape))
        # A container returns its last child's tensor: keep the first (innermost) name per tensor.
        # A tensor changed in place later (ResNet's `out += identity` then ReLU(inplace=True) on a
        # BatchNorm's output) is the same object with a higher version: a different value, so the
        # BatchNorm does not take the name of the block's output.
        first_name = {}
        for name, t, version, *_ in seen:
            first_name.setdefault((id(t), version), name)
        records = []
        for name, t, version, module, first, first_version in seen:
            if first_name[(id(t), version)] != name or t.dim() < 2 or t.shape[0] != 1 or not t.is_floating_point():
                continue
            kind = "norm" if "Norm" in type(module).__name__ else "softmax" if _is_softmax(t) else ""
            source = None if first is None else first_name.get((id(first), first_version))
            records.append(LayerRecord(name, tuple(t.shape[1:]), kind, source))
        return records

    # ---- memory budget ------------------------------------------------------------------------
    def sample_bytes(self, sample_shape):
        key = tuple(sample_shape)
        if key not in self._bytes_per_sample:
            seen, _ = self._trace(key)
            # Forward keeps roughly every activation for backward; backward holds about as much again.
            # A container's output is its last child's tensor, an in-place op's its input's: count
            # each storage once, or those tensors count two or three times over.
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t, *_ in seen}
            self._bytes_per_sample[key] = max(1, 2 * sum(storages.values()))
        return self._bytes_per_sample[key]

    # ---- BatchNorm folding --------------------------------------------------------------------
    def _model_for(self, layers, x):
        """The module a call runs: the model with its BatchNorms folded where that works and
        computes the model's outputs and input gradient on the first input it is checked on, else
        the model itself. Each set of layers is traced once and checked once, whatever the verdict."""
        if not self.fold_batchnorm:
            return self.model
        state = self._weights_state()
        if state != self._folded_from:   # weights changed since the folds (trained, reloaded): fold anew
            self._folded.clear()
            self._folded_convs.clear()
            self._folded_from = state
        key = frozenset(layers)
        if key not in self._folded:
            if len(self._folded) >= _FOLDED_VARIANTS:
                self._folded.pop(next(iter(self._folded)))
            self._folded[key] = [self._fold(key), None]   # [the folded module or None, whether it agrees]
        entry = self._folded[key]
        folded, accepted = entry
        if folded is None:
            return self.model
        if accepted is None:
            accepted = self._fold_agrees(folded, x[:1])
            if accepted is None:   # the model as written fails on this input: let the call report it
                return self.model
            entry[1] = accepted
        return folded if accepted else self.model

    def _weights_state(self):
        """Which tensors the model's parameters and buffers are, and how often each was changed in
        place (an optimizer step or load_state_dict bumps the count)."""
        return [(id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers())]

    def _fold(self, keep):
        try:
            folded, count = fold_batchnorm(self.model, keep, self._folded_convs)
        except Exception:   # noqa: BLE001 - a model torch.fx cannot trace runs unfolded
            return None
        if count == 0:
            return None
        if self.channels_last:
            folded.to(memory_format=torch.channels_last)
        return folded

    def _fold_agrees(self, folded, probe):
        """Whether the folded module's output and input gradient (of a fixed random weighting of
        the outputs) on `probe` are the model's, up to float32 rounding; None when the model as
        written fails on it. The check's passes are the backend's own: the modules' hooks (the
        user's, a call's) are set aside while they run, so none sees a pass no call asked for."""
        def output_and_gradient(module):
            xt = torch.from_numpy(probe).to(self.device)
            if self.channels_last:
                xt = xt.contiguous(memory_format=torch.channels_last)
            xt.requires_grad_(True)
            out = module(xt)
            if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.requires_grad):
                raise TypeError("no differentiable tensor output")
            seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(out.device)
            (grad,) = torch.autograd.grad((out * seed).sum(), xt)
            return out.detach(), grad

        with self._no_parameter_grads(), _hooks_set_aside(self.model), torch.enable_grad():
            try:
                expected = output_and_gradient(self.model)
            except Exception:   # noqa: BLE001 - the call itself says why the model fails
                return None
            try:
                actual = output_and_gradient(folded)
            except Exception:   # noqa: BLE001 - a graph torch.fx traced but that does not run
                return False
        return all(a.shape == e.shape and _relative_error(a, e) <= tol
                   for a, e, tol in zip(actual, expected, (_FOLD_TOLERANCE, _FOLD_GRADIENT_TOLERANCE)))

    # ---- the seam -----------------------------------------------------------------------------
    @contextmanager
    def _explained(self, shape):
        """The model's own failure (inputs it cannot take, a shape mismatch inside) as one line."""
        try:
            yield
        except MultisalError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise MultisalError(f"{self.describe()} failed on inputs of shape {tuple(shape)}: {reason[:300]}") from None

    @contextmanager
    def _no_parameter_grads(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def _run(self, x, objective, target, layers, input_grad):
        captured = {}
        handles = []

        def capture(name):
            def hook(_module, _inputs, output):
                if not isinstance(output, torch.Tensor):
                    raise MultisalError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
                if want_grad and not output.requires_grad:
                    # Nothing upstream needs a gradient (no input gradient asked): start the graph
                    # here, so backward stops at this layer.
                    output = output.detach().requires_grad_(True)
                captured[name] = output
                # Hand a copy downstream so an in-place op after this layer cannot alter (or break the
                # autograd history of) the activation we report.
                return output.clone()
            return hook

        want_grad = objective is not None and bool(input_grad or layers)
        for name in layers:
            handles.append(self._module(name).register_forward_hook(capture(name)))
        try:
            with self._unfused_attention(layers), self._no_parameter_grads(), torch.set_grad_enabled(want_grad), \
                    self._explained(x.shape):
                model = self._model_for(layers, x)
                xt = torch.from_numpy(x).to(self.device)
                if self.channels_last:
                    xt = xt.contiguous(memory_format=torch.channels_last)
                if want_grad and input_grad:
                    xt.requires_grad_(True)
                out = model(xt)
                if not isinstance(out, torch.Tensor):
                    raise MultisalError(f"{type(self.model).__name__} returns {type(out).__name__}; "
                                        "the torch backend needs a model whose output is one tensor")
                missing = [n for n in layers if n not in captured]
                if missing:
                    raise MultisalError(f"layer {missing[0]!r} did not run in the forward pass")
                result = Result(outputs=out.detach().cpu().numpy())
                result.activations = {n: a.detach().cpu().numpy() for n, a in captured.items()}
                if objective is None:
                    return result
                value, result.target = _objective(out, objective, target)
                if not want_grad:
                    return result
                wrt = ([xt] if input_grad else []) + [captured[n] for n in layers]
                if not all(t.requires_grad for t in wrt):
                    raise MultisalError("the objective does not depend on the requested layer or input")
                grads = torch.autograd.grad(value, wrt)
        finally:
            for h in handles:
                h.remove()
        if input_grad:
            result.input_grad = grads[0].cpu().numpy()
            grads = grads[1:]
        result.gradients = {n: g.cpu().numpy() for n, g in zip(layers, grads)}
        return result

    def _run_replaced(self, x, replace):
        """A forward pass without autograd in which a forward hook returns each replaced layer's
        array in place of its output (torch passes a hook's return value on downstream)."""
        replaced = set()

        def substitute(name, value):
            def hook(_module, _inputs, output):
                if not isinstance(output, torch.Tensor):
                    raise MultisalError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
                if tuple(output.shape) != value.shape:
                    raise MultisalError(f"replace[{name!r}] has shape {value.shape}; layer {name!r} gives "
                                        f"{tuple(output.shape)} for these inputs")
                replaced.add(name)
                # empty_like keeps the output's device, dtype and memory format (channels_last).
                return torch.empty_like(output).copy_(torch.from_numpy(value))
            return hook

        handles = [self._module(name).register_forward_hook(substitute(name, value)) for name, value in replace.items()]
        try:
            with self._unfused_attention(list(replace)), torch.no_grad(), self._explained(x.shape):
                model = self._model_for(list(replace), x)
                xt = torch.from_numpy(x).to(self.device)
                if self.channels_last:
                    xt = xt.contiguous(memory_format=torch.channels_last)
                out = model(xt)
        finally:
            for h in handles:
                h.remove()
        missing = [name for name in replace if name not in replaced]
        if missing:
            raise MultisalError(f"layer {missing[0]!r} did not run in the forward pass")
        if not isinstance(out, torch.Tensor):
            raise MultisalError(f"{type(self.model).__name__} returns {type(out).__name__}; "
                                "the torch backend needs a model whose output is one tensor")
        return Result(outputs=out.cpu().numpy())


def _is_softmax(t):
    """Whether a tensor of one sample looks like attention probabilities: (1, heads, T, T), >= 0,
    each row summing to 1."""
    if t.dim() != 4 or t.shape[-1] != t.shape[-2] or t.shape[-1] < 2:
        return False
    rows = t.detach().double().sum(-1)
    return bool(t.min() >= 0) and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-4))


class _TorchOps:
    """The objective's operations (multisal.objectives) on torch tensors."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def softmax(x, axis):
        return torch.softmax(x, axis)

    @staticmethod
    def log_softmax(x, axis):
        return torch.log_softmax(x, axis)

    @staticmethod
    def neg(x):
        return -x

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def total(x):
        return x.sum()

    @staticmethod
    def argmax(x, axis):
        return x.detach().argmax(axis)

    def indices(self, target):
        return torch.from_numpy(np.asarray(target)).to(self.device)

    @staticmethod
    def one_hot(indices, n):
        return torch.nn.functional.one_hot(indices, n)

    @staticmethod
    def shape(x):
        return tuple(x.shape)

    def constant(self, array):
        return torch.from_numpy(np.asarray(array)).to(self.device)

    @staticmethod
    def take(x, axis, start, stop):
        return x.narrow(axis, start, stop - start)

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def sub(a, b):
        return a - b

    @staticmethod
    def minimum(a, b):
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        return torch.maximum(a, b)

    @staticmethod
    def at_least(a, b):
        return (a >= b).to(a.dtype)

    @staticmethod
    def stop_gradient(x):
        return x.detach()


# The per-module hook tables of torch.nn.Module (those a module has; their names vary by version).
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@contextmanager
def _hooks_set_aside(model):
    """Every module of model without hooks for the duration of the block, then with its own again."""
    saved = [(table, dict(table)) for m in model.modules() for name in _HOOK_TABLES
             if isinstance(table := getattr(m, name, None), dict)]
    for table, _ in saved:
        table.clear()
    try:
        yield
    finally:
        for table, hooks in saved:
            table.clear()
            table.update(hooks)


def _relative_error(actual, expected):
    """Relative L2 error, in float64."""
    actual, expected = actual.double(), expected.double()
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-300))


def _objective(out, objective, target):
    """The sum over the batch of each sample's objective, and the class index each one used."""
    value, indices = objective_value(_TorchOps(out.device), out, objective, target)
    return value, None if indices is None else indices.cpu().numpy()


def _state_dict(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MultisalError(f"weights file {path!r} not found") from None
    except Exception as err:
        # An exception may carry no text at all (torch.load of a zero-byte file: a bare EOFError).
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MultisalError(f"cannot read weights {path!r} as a state dict: {reason}") from None
    if not isinstance(state, Mapping):
        raise MultisalError(f"weights {path!r} hold a {type(state).__name__}, not a state dict")
    return state


def _torchscript(path):
    if not os.path.isfile(path):
        raise MultisalError(f"model file {path!r} not found")
    try:
        script = torch.jit.load(path, map_location="cpu")
    except Exception:
        try:
            is_state = isinstance(torch.load(path, map_location="cpu", weights_only=True), Mapping)
        except Exception:
            is_state = False
        if is_state:
            raise MultisalError(f"model {path!r} is a state dict without an architecture: give "
                                f"model = 'package.module:factory' and weights = {path!r}") from None
        raise MultisalError(f"model {path!r} is neither TorchScript (torch.jit.save) nor a state dict") from None
    return _scripted(script.eval())


def _scripted(script):
    """A TorchScript module behind a plain nn.Module.

    ScriptModules refuse Python forward hooks, and the torch backend hooks every named submodule
    to size its batches and to read layers. Kept out of named_modules(), the script runs whole:
    gradient methods work; CAM methods find no layer to hook and say so. Its parameters are still
    reported (so none gets a gradient) and .to()/.float() still reach it.
    """
    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "script", script)   # bypasses submodule registration

        def forward(self, x):
            return self.script(x)

        def parameters(self, recurse=True):
            return self.script.parameters(recurse)

        def _apply(self, fn, *args, **kwargs):
            self.script._apply(fn, *args, **kwargs)
            return super()._apply(fn, *args, **kwargs)

    return Scripted()
