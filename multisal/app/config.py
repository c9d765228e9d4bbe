"""Configuration of an explain run: one TOML file, or a dict with the same keys (README,
"Configuration").

Validation is strict, because a typo that is silently ignored costs a whole run: an unknown key, a
wrong type or an impossible combination fails with one line naming the key, the value and what is
allowed. A method table's keys are that method's Python keywords, read from its signature, so the
file and the Python API cannot drift apart.

A backend's table ([torch], [onnx], [chainer], or a registered backend's) takes exactly the
keywords of its class's __init__ (Backend.options), each checked by its type annotation, so the
tables cannot drift from the backends either.

Paths in a configuration are relative to the current directory (as on the command line, whose
options override the file key by key). Nothing here imports a framework.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
import typing
from collections.abc import Mapping

from .. import models
from ..backend import MAX_SAMPLES_PER_CALL, ByteSize
from ..errors import MultisalError
from ..files import read_text
from ..layouts import LAYOUTS
from ..methods import DEFAULT_METHODS, METHODS
from ..methods.attention import HEAD_FUSIONS
from ..methods.integrated_gradients import MAX_STEPS
from ..methods.integrated_gradients import METHODS as PATHS
from ..methods.rise import MAX_MASKS
from ..modelspec import model_kind
from ..noise import MAX_SAMPLES
from ..objectives import ARGMAX_PER_SAMPLE, DETECTION_FORMATS, OBJECTIVES
from ..presets import PRESETS, get_preset
from ..registry import backend_class, backends

try:
    import tomllib
except ModuleNotFoundError:   # Python < 3.11: the same parser, published as tomli
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

DEFAULT_MODEL = "efficientnet-lite0"
DEFAULT_OUTPUT = "out/explain"
# Images explained together (per actor call on ray): each method runs once over them.
DEFAULT_BATCH = 8


class ConfigError(MultisalError):
    """A configuration that cannot run, explained in one line naming the key."""


def _show(value) -> str:
    """A value as the TOML file spells it (strings quoted, true/false), for error messages."""
    return json.dumps(value, ensure_ascii=False, default=repr)


def _fail(key, value, allowed):
    raise ConfigError(f"config key {key!r}: expected {allowed}, got {_show(value)}")


# ---- rules: (description of what is allowed, test) ---------------------------------------------
class Rule:
    """What a key allows (in words, for the error), the test of a value, an optional conversion,
    and an optional upper bound (bound, what it counts) checked once the type is right."""

    def __init__(self, allowed, test, convert=None, bound=None):
        self.allowed, self.test, self.convert, self.bound = allowed, test, convert, bound

    def __call__(self, key, value):
        if isinstance(value, tuple):   # Python callers write (224, 224); TOML has only arrays
            value = list(value)
        if not self.test(value):
            _fail(key, value, self.allowed)
        if self.bound is not None and _is_number(value) and value > self.bound[0]:
            raise ConfigError(f"config key {key!r}: {_show(value)} is over the limit of {self.bound[0]} {self.bound[1]}")
        return self.convert(value) if self.convert else value


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)   # True is an int to Python, not to TOML


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")


def integer(lo=0, bound=None):
    return Rule(f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo, bound=bound)


def number(lo=None):
    return Rule("a number" + (f" >= {lo}" if lo is not None else ""),
                lambda v: _is_number(v) and (lo is None or v >= lo), float)


BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")


def choice(*options):
    return Rule("one of " + ", ".join(_show(o) for o in options), lambda v: isinstance(v, str) and v in options)


def text_list(allowed="a list of non-empty strings"):
    return Rule(allowed, lambda v: isinstance(v, list) and all(isinstance(s, str) and s.strip() for s in v))


SIZE = Rule("[height, width], integers 1..8192",
            lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(d) and 1 <= d <= 8192 for d in v))
WINDOW = Rule("[channels, height, width], integers 1..8192",
              lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(d) and 1 <= d <= 8192 for d in v))
# A byte count, or a string such as "2GiB" (the backends parse it).
MEMORY = Rule('a number of bytes >= 1 or a size such as "2GiB"',
              lambda v: (_is_int(v) and v >= 1) or (isinstance(v, str) and re.fullmatch(r"\s*[\d.]+\s*[KMG]?i?B\s*", v, re.I)))
TARGET_ALLOWED = (f'"auto", "{ARGMAX_PER_SAMPLE}", a class index >= 0, a class name or '
                  '{detection = {class = C, box = [x1, y1, x2, y2], iou = 0.5}}')
# A detection target's keys: what each allows, its test, and its default (None: none written).
DETECTION_REQUIRED = ("class", "box")
DETECTION_KEYS = {
    "class": ("a class index >= 0", lambda v: _is_int(v) and v >= 0, None),
    "box": ("[x1, y1, x2, y2] in input pixels, x1 < x2 and y1 < y2",
            lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(c) for c in v)
            and v[0] < v[2] and v[1] < v[3], None),
    "iou": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1, 0.5),
    "format": ("one of " + ", ".join(f'"{f}"' for f in DETECTION_FORMATS), lambda v: v in DETECTION_FORMATS, "yolov8"),
    "axis": ("1 or 2 (the axis of an anchor's values)", lambda v: _is_int(v) and v in (1, 2), None),
}


def _target(key, value):
    """The top-level `target`: as TARGET_ALLOWED says; a detection table gets its defaults."""
    if isinstance(value, Mapping):
        if set(value) != {"detection"} or not isinstance(value["detection"], Mapping):
            _fail(key, value, TARGET_ALLOWED)
        table = dict(value["detection"])
        for name in table:
            if name not in DETECTION_KEYS:
                raise ConfigError(f"config key '{key}.detection.{name}': unknown key (value {_show(table[name])}); "
                                  f"a detection target takes {', '.join(DETECTION_KEYS)}")
        out = {}
        for name, (allowed, test, default) in DETECTION_KEYS.items():
            if name in table:
                if not test(table[name]):
                    _fail(f"{key}.detection.{name}", table[name], allowed)
                out[name] = [float(c) for c in table[name]] if name == "box" else table[name]
            elif name in DETECTION_REQUIRED:
                raise ConfigError(f"config key '{key}.detection.{name}': missing; expected {allowed}")
            elif default is not None:
                out[name] = default
        return {"detection": out}
    if (_is_int(value) and value >= 0) or (isinstance(value, str) and value.strip() != ""):
        return value
    _fail(key, value, TARGET_ALLOWED)


TOKEN_GRID = Rule("[rows, columns], integers 1..8192",
                  lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(d) and 1 <= d <= 8192 for d in v))


def _methods_rule():
    return Rule("a non-empty list of distinct methods from " + ", ".join(METHODS),
                lambda v: isinstance(v, list) and v and all(isinstance(m, str) and m in METHODS for m in v)
                and len(set(v)) == len(v))


def _keyword_rules():
    """Rules for the keywords a method table may set, by keyword (the same meaning in every method)."""
    return {
        "objective": choice(*OBJECTIVES),
        "n": integer(1, (MAX_SAMPLES, "noisy samples")), "steps": integer(1, (MAX_STEPS, "path points")),
        "batch_size": integer(1, (MAX_SAMPLES_PER_CALL, "inputs a call")), "seed": integer(0), "max_n": integer(1, (MAX_SAMPLES, "samples")),
        "noise_level": number(0), "sigma": number(0), "eps": number(0),
        "tol": Rule("a number > 0", lambda v: _is_number(v) and v > 0, float),
        "baseline": number(),            # a constant in model space (TOML has no arrays of images)
        "noise": choice("normal", "legacy"),
        "channel_reduce": choice("max", "mean", "none"),   # "none" is Python's None (TOML has no null)
        "abs": BOOLEAN, "square": BOOLEAN, "upsample": BOOLEAN, "normalize": BOOLEAN, "region": BOOLEAN,
        "layer": TEXT,
        "layout": choice(*LAYOUTS), "prefix_tokens": integer(0, (8192, "tokens")), "token_grid": TOKEN_GRID,
        "method": choice(*PATHS),
        "filters": Rule("a non-empty list of feature-map indices (integers >= 0)",
                        lambda v: isinstance(v, list) and v and all(_is_int(i) and i >= 0 for i in v)),
        "neurons": Rule("a list of [row, col] pairs (integers >= 0)",
                        lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2
                                                              and all(_is_int(i) and i >= 0 for i in p) for p in v)),
        "center": BOOLEAN, "channel_softmax": BOOLEAN,
        # The attention methods' attention layers and how each layer's heads are fused.
        "layers": Rule("a non-empty list of layer names", lambda v: isinstance(v, list) and v
                       and all(isinstance(s, str) and s.strip() for s in v)),
        "head_fusion": choice(*HEAD_FUSIONS),
        "discard_ratio": Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1, float),
        # Occlusion's window and its step, (channels, height, width). How many windows an image gets
        # depends on its size too, which is known only when it runs: the method bounds that count.
        "window": WINDOW, "stride": WINDOW,
        "n_masks": integer(1, (MAX_MASKS, "masks")), "grid": integer(1, (8192, "cells a side")),
        "p": Rule("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1, float),
    }


# Where one method gives a keyword more values than the others do.
METHOD_RULES = {
    ("smoothgrad", "n"): Rule('an integer >= 1 or "auto"', lambda v: (_is_int(v) and v >= 1) or v == "auto",
                              bound=(MAX_SAMPLES, "noisy samples")),
}


def _rule_from_default(default):
    """A rule for a keyword no table above knows yet, from the type of its default (None if there
    is nothing to go by): a method that gains a keyword is configurable at once, type-checked."""
    if isinstance(default, bool):
        return BOOLEAN
    if _is_int(default):
        return Rule("an integer", _is_int)
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return TEXT
    return None


# Keywords of the methods that a table may not set, and why (the run supplies them).
RUN_OWNED = {
    "be": "the backend comes from 'backend' and 'model'",
    "x": "the inputs come from 'inputs'",
    "target": "set the top-level key 'target'",
    "preset": "set the top-level key 'preset'",
    "progress": "progress bars are shown when stderr is a terminal",
    "stats": "the run records what the method reports (samples used) in the manifest",
}

def _rule_from_type(annotation):
    """The rule for a backend option of this type annotation (Optional[X] is X's rule; a string
    in Annotated[X, "..."] says what is allowed); None for a type a TOML value cannot be checked
    against, which is passed as written."""
    allowed = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        allowed = next((e for e in extras if isinstance(e, str)), None)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return _rule_from_type(args[0] if allowed is None else typing.Annotated[args[0], allowed])
    if annotation is ByteSize:
        return MEMORY
    if annotation is bool:
        return BOOLEAN
    if annotation is int:
        return Rule(allowed or "an integer >= 1", lambda v: _is_int(v) and v >= 1)
    if annotation is float:
        return number()
    if annotation is str:
        return TEXT
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (str,):
        return text_list(allowed or "a list of non-empty strings")
    return None


def backend_table(name):
    """{option: rule} of a backend's table: its class's options, checked by their types."""
    rules = {}
    for key, (annotation, _default) in backend_class(name).options().items():
        rule = _rule_from_type(annotation)
        rules[key] = rule if rule is not None else Rule("any value", lambda v: True)
    return rules


# Where explain and batch run (multisal.batch); the ray keys are kept while name = "local", so that
# switching engines stays a one-line change.
ENGINE_TABLE = {
    "name": choice("local", "ray"),
    "batch_size": integer(1),        # images explained together (per actor call on ray)
    "address": TEXT,                 # ray: a cluster's address; unset starts a local cluster
    "num_cpus": integer(1),          # ray: CPUs of the local cluster (default: all)
    "actors": integer(1),            # ray: size of the actor pool (default: CPUs // cpus_per_actor)
    "cpus_per_actor": number(lo=0),  # ray: default 1
    "gpus_per_actor": number(lo=0),  # ray: default 0
}


def method_keywords(name):
    """{keyword: rule} a method's table accepts: its signature's keywords, less those the run owns."""
    rules = _keyword_rules()
    out = {}
    for key, param in inspect.signature(METHODS[name]).parameters.items():
        rule = METHOD_RULES.get((name, key)) or rules.get(key) or _rule_from_default(param.default)
        if key not in RUN_OWNED and rule is not None:
            out[key] = rule
    return out


def model_help():
    """What a configuration's `model` may be, from the models/ names and the registered backends."""
    files = sorted({suffix for cls in backends().values() for suffix in cls.model_files})
    listed = ", ".join(files[:-1]) + (" or " if len(files) > 1 else "") + files[-1] if files else ""
    return (f"a models/ name ({', '.join(models.names())}), " + (f"an {listed} file, " if files else "")
            + 'or "package.module:factory"')


def _is_model(value):
    if not isinstance(value, str):
        return False
    kind = model_kind(value)
    return kind in ("name", "factory") or any(kind in cls.model_files for cls in backends().values())


def _top_rules():
    return {
        "backend": choice(*backends()),
        "model": Rule(model_help(), _is_model),
        "weights": TEXT,
        "preset": choice(*PRESETS),
        "labels": Rule("a text file with one class name per line", TEXT.test),
        "size": SIZE,
        "inputs": text_list("a list of image files, globs, folders, .txt lists or skimage:NAME"),
        "output": TEXT,
        "methods": _methods_rule(),
        "target": _target,
        "layer": TEXT,
        # How the CAM layer's activation reads as feature maps (multisal.layouts), for every CAM method.
        "layout": choice(*LAYOUTS), "prefix_tokens": integer(0, (8192, "tokens")), "token_grid": TOKEN_GRID,
        "progression": BOOLEAN,
    }


# ---- reading, merging, validating ---------------------------------------------------------------
def parse_inline_table(text, what) -> dict:
    """A TOML inline table given as text (the command line's --target), or ConfigError naming `what`."""
    if tomllib is None:
        raise ConfigError(f"{what}: reading a TOML inline table on Python < 3.11 needs tomli: pip install tomli")
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what}: expected a TOML inline table such as "
                          f"'{{detection = {{class = 0, box = [10, 20, 60, 80]}}}}', got {text!r} ({err})") from None


def read_toml(path) -> dict:
    if tomllib is None:
        raise ConfigError("reading a TOML configuration on Python < 3.11 needs tomli: pip install tomli")
    try:
        text = read_text(path, "config file", limit=1 << 20)
    except MultisalError as err:
        raise ConfigError(str(err)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None


# The keys that say which layer the CAM methods read and how its activation reads as feature maps.
LAYER_KEYS = ("layer", "layout", "prefix_tokens", "token_grid")


def apply_overrides(raw: dict, overrides: Mapping) -> dict:
    """raw with the command line's options (None = not given) in place of the file's values.

    --layer names the layer of every CAM method, so it also replaces a layer a method table sets,
    and the layout keys (layout, prefix_tokens, token_grid) that described that table's layer.
    """
    merged = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        if value is None:
            continue
        merged[key] = value
        if key == "layer":
            for table in merged.values():
                if isinstance(table, dict):
                    for owned in LAYER_KEYS:
                        table.pop(owned, None)
    return merged


def load_config(source=None, overrides: Mapping = None) -> dict:
    """The validated configuration, defaults filled in, from a dict, a TOML file's path or None
    (all defaults), with `overrides` (the command line) applied on top."""
    if source is None:
        raw = {}
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        raw = read_toml(source)
    else:
        raise ConfigError(f"a configuration is a dict or the path of a TOML file, got {type(source).__name__}")
    return validate(apply_overrides(raw, overrides or {}))


def validate(raw: Mapping) -> dict:
    """Check every key and fill in the defaults; ConfigError (one line) on the first problem."""
    top = _top_rules()
    tables = {**{m: method_keywords(m) for m in METHODS}, **{b: backend_table(b) for b in backends()},
              "engine": ENGINE_TABLE}
    cfg = {}
    for key, value in raw.items():
        if key in top:
            cfg[key] = top[key](key, value)
        elif key in tables:
            if not isinstance(value, Mapping):
                _fail(key, value, f"a table of {key} options ({', '.join(tables[key])})")
            cfg[key] = _validate_table(key, value, tables[key])
        else:
            allowed = ", ".join(list(top) + [f"[{t}]" for t in tables])
            raise ConfigError(f"config key {key!r}: unknown key (value {_show(value)}); allowed keys are {allowed}")
    _check_combinations(cfg)
    return _with_defaults(cfg, top, tables)


def _validate_table(name, table, rules):
    out = {}
    for key, value in table.items():
        full = f"{name}.{key}"
        if key in RUN_OWNED:
            raise ConfigError(f"config key {full!r}: not a table option ({RUN_OWNED[key]}), got {_show(value)}")
        if key not in rules:
            raise ConfigError(f"config key {full!r}: unknown key (value {_show(value)}); "
                              f"[{name}] accepts {', '.join(rules) or 'no keys'}")
        out[key] = rules[key](full, value)
    if "sigma" in out and "noise_level" in out:
        raise ConfigError(f"config key '{name}.sigma': give sigma (absolute) or noise_level (relative), not both "
                          f"(got sigma = {_show(out['sigma'])}, noise_level = {_show(out['noise_level'])})")
    return out


def _check_combinations(cfg):
    backend = cfg.get("backend", "torch")
    model = cfg.get("model", DEFAULT_MODEL)
    kind = model_kind(model)
    problem = backend_class(backend).model_problem(model, cfg.get("weights"))
    if problem:
        key, reason = problem
        owner = next((c for c in backends().values() if kind in c.model_files), None)
        if key == "backend" and owner is not None:
            reason += f": {owner.model_files[kind]} needs backend = {_show(owner.name)}"
        raise ConfigError(f"config key {key!r}: {reason}")
    if model == "vgg16-chainer" and "weights" not in cfg:
        raise ConfigError(f"config key 'weights': missing; {models._VGG_WEIGHTS_HELP}")
    if "preset" not in cfg and kind != "name":
        raise ConfigError(f"config key 'preset': missing; model {_show(model)} has no preset of its own: "
                          f"expected one of {', '.join(PRESETS)}")


def _with_defaults(cfg, top, tables):
    model = cfg.get("model", DEFAULT_MODEL)
    preset = cfg.get("preset") or models.preset_for(model, cfg.get("weights"))
    defaults = {
        "backend": "torch", "model": DEFAULT_MODEL, "preset": preset,
        "size": list(get_preset(preset).size), "inputs": [], "output": DEFAULT_OUTPUT,
        "methods": list(DEFAULT_METHODS), "target": "auto", "progression": False,
    }
    # Schema order, so the config.toml a run writes reads the same way every time.
    out = {k: cfg[k] if k in cfg else defaults[k] for k in top if k in cfg or k in defaults}
    out.update({k: cfg[k] for k in tables if k in cfg})
    return out


def method_options(cfg, name) -> dict:
    """The keyword arguments a method table gives, as the Python API takes them."""
    options = dict(cfg.get(name, {}))
    if options.get("channel_reduce") == "none":
        options["channel_reduce"] = None
    if "neurons" in options:
        options["neurons"] = [tuple(p) for p in options["neurons"]]
    if "token_grid" in options:
        options["token_grid"] = tuple(options["token_grid"])
    return options


# ---- writing ------------------------------------------------------------------------------------
def dump_toml(cfg: Mapping, header: str = "") -> str:
    """A validated configuration as TOML: top-level keys first, then one [table] each."""
    lines = [f"# {line}" for line in header.splitlines()]
    tables = []
    for key, value in cfg.items():
        if isinstance(value, Mapping) and key != "target":   # the target's table stays inline
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{_toml_key(name)}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_key(key):
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if _is_int(value):
        return str(value)
    if isinstance(value, float):
        return repr(value)   # 0.15, 1e-06, inf and nan are all TOML
    if isinstance(value, str):
        # JSON's escapes (\" \\ \n \uXXXX ...) are all TOML escapes; DEL is the one control
        # character JSON leaves alone and TOML forbids.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):   # an inline table: the detection target
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
