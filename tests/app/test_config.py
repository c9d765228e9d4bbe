"""Configuration: one-line errors naming the key, the value and what is allowed; defaults; the
command line's overrides; config.toml written back and read again; load_backend(config); the
shipped examples (the torch and onnx ones differ in the backend line only)."""
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

import multisal as ms
from multisal.methods import DEFAULT_METHODS
from multisal.app.config import RUN_OWNED, ConfigError, _keyword_rules, dump_toml, load_config, tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TINY = {"model": "tiny_models:classifier", "preset": "raw", "size": [32, 32]}
ALL_METHODS = ", ".join(ms.METHODS)


@pytest.mark.parametrize("config, message", [
    ({"integrated_gradients": {"steps": "fifty"}},
     "config key 'integrated_gradients.steps': expected an integer >= 1, got \"fifty\""),
    ({"smoothgrad": {"n": "fifty"}}, "config key 'smoothgrad.n': expected an integer >= 1"),
    ({"smooth_gradcam_pp": {"n": True}}, "config key 'smooth_gradcam_pp.n': expected an integer >= 1, got true"),
    ({"modle": "x"}, "config key 'modle': unknown key (value \"x\"); allowed keys are backend, model, weights,"),
    ({"gradcam": {"n": 4}},
     "config key 'gradcam.n': unknown key (value 4); [gradcam] accepts layer, upsample, normalize, objective"),
    ({"smoothgrad": {"target": 3}},
     "config key 'smoothgrad.target': not a table option (set the top-level key 'target'), got 3"),
    ({"smoothgrad": {"progress": True}}, "config key 'smoothgrad.progress': not a table option"),
    ({"smoothgrad": 5}, "config key 'smoothgrad': expected a table of smoothgrad options (objective, n,"),
    ({"methods": ["smoothgrad", "lime"]},
     f"config key 'methods': expected a non-empty list of distinct methods from {ALL_METHODS}, "
     "got [\"smoothgrad\", \"lime\"]"),
    ({"methods": []}, "config key 'methods': expected a non-empty list"),
    ({"size": [224]}, "config key 'size': expected [height, width], integers 1..8192, got [224]"),
    ({"backend": "tf"}, "config key 'backend': expected one of \"torch\", \"onnx\", \"chainer\", got \"tf\""),
    ({"target": -1}, "config key 'target': expected \"auto\", \"argmax_per_sample\", a class index >= 0, a class name or "
                     "{detection = {class = C, box = [x1, y1, x2, y2], iou = 0.5}}, got -1"),
    ({"target": 1.5}, "config key 'target': expected \"auto\", \"argmax_per_sample\", a class index >= 0"),
    ({"model": "resnet50"}, "config key 'model': expected a models/ name (efficientnet-lite0, vgg16-chainer), "
                            "an .onnx, .pt or .pth file, or \"package.module:factory\", got \"resnet50\""),
    ({"progression": "yes"}, "config key 'progression': expected true or false, got \"yes\""),
    ({"smoothgrad": {"noise": "uniform"}}, "config key 'smoothgrad.noise': expected one of \"normal\", \"legacy\""),
    ({"smoothgrad": {"sigma": 0.3, "noise_level": 0.2}},
     "config key 'smoothgrad.sigma': give sigma (absolute) or noise_level (relative), not both "
     "(got sigma = 0.3, noise_level = 0.2)"),
    ({"smooth_gradcam_pp": {"neurons": [[1, 2, 3]]}},
     "config key 'smooth_gradcam_pp.neurons': expected a list of [row, col] pairs"),
    ({"onnx": {"providers": "CPUExecutionProvider"}},
     "config key 'onnx.providers': expected a list of onnxruntime provider names, got \"CPUExecutionProvider\""),
    ({"torch": {"memory_budget": "lots"}}, "config key 'torch.memory_budget': expected a number of bytes"),
    ({"engine": {"name": "spark"}}, "config key 'engine.name': expected one of \"local\", \"ray\", got \"spark\""),
    ({"engine": {"cpus_per_actor": -1}}, "config key 'engine.cpus_per_actor': expected a number >= 0, got -1"),
    ({"engine": {"workers": 4}}, "config key 'engine.workers': unknown key (value 4); [engine] accepts name, batch_size, "
                                 "address, num_cpus, actors, cpus_per_actor, gpus_per_actor"),
    ({"backend": "torch", "model": "m.onnx"},
     "config key 'backend': \"torch\" cannot run model \"m.onnx\": an .onnx model needs backend = \"onnx\""),
    ({"backend": "onnx", "model": "m.pt"}, "config key 'backend': \"onnx\" cannot run model \"m.pt\""),
    ({"backend": "onnx", "model": "m.onnx", "weights": "w.pt"}, "config key 'weights': \"w.pt\" goes with a models/ name"),
    ({"backend": "chainer"}, "config key 'model': \"efficientnet-lite0\" is a PyTorch model"),
    ({"model": "vgg16-chainer"}, "config key 'weights': missing; vgg16-chainer needs weights=PATH"),
    ({"model": "pkg.mod:make"}, "config key 'preset': missing; model \"pkg.mod:make\" has no preset of its own"),
])
def test_errors_are_one_line_naming_key_value_and_what_is_allowed(config, message):
    with pytest.raises(ConfigError) as info:
        load_config(config)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_every_method_keyword_has_a_rule():
    """A keyword added to a method gets a rule here (or is owned by the run), not a guessed one."""
    rules = _keyword_rules()
    for name, method in ms.METHODS.items():
        for key in list(inspect.signature(method).parameters):
            assert key in rules or key in RUN_OWNED, f"{name}({key}=...) has no configuration rule"


def test_defaults():
    assert load_config({}) == {
        "backend": "torch", "model": "efficientnet-lite0", "preset": "efficientnet-lite", "size": [224, 224],
        "inputs": [], "output": "out/explain", "methods": list(DEFAULT_METHODS), "target": "auto", "progression": False}
    # Every method but the perturbation ones, which run hundreds of forward passes per image, and the
    # attention ones, which need a vision transformer's attention layers.
    assert set(ms.METHODS) - set(DEFAULT_METHODS) == {"scorecam", "ablationcam", "occlusion", "rise",
                                                      "attention_rollout", "transformer_attribution"}


def test_command_line_overrides_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('methods = ["gradcam"]\noutput = "from-file"\ntarget = 3\n[gradcam]\nlayer = "a"\nupsample = false\n')
    cfg = load_config(path, {"methods": ["smoothgrad"], "layer": "b", "output": None, "target": "auto"})
    assert cfg["methods"] == ["smoothgrad"] and cfg["target"] == "auto"
    assert cfg["output"] == "from-file"                                   # not given: the file's value
    assert cfg["layer"] == "b" and cfg["gradcam"] == {"upsample": False}  # --layer beats the table's layer


def test_written_toml_reads_back_the_same():
    cfg = load_config({**TINY, "inputs": ['a "quoted" \\ path\n.png', "ünïcode.png", "del\x7f.png"],
                       "target": "tabby, tabby cat", "smoothgrad": {"noise_level": 0.25, "square": True, "n": 7},
                       "smooth_gradcam_pp": {"neurons": [[1, 2], [3, 4]], "region": True},
                       "onnx": {"providers": ["CPUExecutionProvider"]}})
    text = dump_toml(cfg, header="a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n")
    assert load_config(tomllib.loads(text)) == cfg


def test_toml_syntax_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("backend = torch\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad.toml' is not valid TOML: .*line 1"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file 'nowhere.toml' not found"):
        load_config("nowhere.toml")


def test_examples_are_valid_and_differ_in_the_backend_line_only():
    for name in ("torch", "onnx", "chainer"):
        cfg = load_config(EXAMPLES / f"{name}.toml")
        assert cfg["backend"] == name
    torch_lines = (EXAMPLES / "torch.toml").read_text().splitlines()
    onnx_lines = (EXAMPLES / "onnx.toml").read_text().splitlines()
    assert len(torch_lines) == len(onnx_lines)
    assert [(a, b) for a, b in zip(torch_lines, onnx_lines) if a != b] == [('backend = "torch"', 'backend = "onnx"')]


@pytest.mark.skipif(importlib.util.find_spec("chainer") is not None, reason="checks the message without chainer")
def test_chainer_example_without_chainer_names_what_to_install():
    with pytest.raises(ms.MissingFrameworkError, match="backend 'chainer' needs chainer"):
        ms.load_backend(str(EXAMPLES / "chainer.toml"))


def test_load_backend_from_a_dict_or_a_file(tmp_path):
    import numpy as np
    config = dict(TINY, torch={"channels_last": False, "fold_batchnorm": False})
    be = ms.load_backend(config)
    assert be.name == "torch" and be.preset.name == "raw" and be.preset.size == (32, 32)
    assert be.channels_last is False and be.fold_batchnorm is False
    # The same configuration through a file: the same layout, so the same bits on every CPU (NCHW
    # against channels_last may differ in the last bit where the convolution kernels differ).
    path = tmp_path / "tiny.toml"
    path.write_text(dump_toml(load_config(config)))
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    assert np.array_equal(ms.load_backend(str(path)).predict(x), be.predict(x))
    assert ms.load_backend(path).name == "torch"                         # a Path works too
    with pytest.raises(ms.MultisalError, match=r"load_backend\(config\) takes no other arguments"):
        ms.load_backend(TINY, device="cpu")
    with pytest.raises(ConfigError, match="config key 'smoothgrad.n'"):
        ms.load_backend(dict(TINY, smoothgrad={"n": 0}))


def test_readme_configuration_example_is_valid():
    import re
    block = re.search(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    cfg = load_config(tomllib.loads(block))
    assert cfg["smoothgrad"] == {"n": 50, "noise_level": 0.15} and cfg["engine"]["name"] == "local"


@pytest.mark.parametrize("name, module, cls", [("torch", "multisal.backends.torch.backend", "TorchBackend"),
                                               ("onnx", "multisal.backends.onnx.backend", "OnnxBackend"),
                                               ("chainer", "multisal.backends.chainer.backend", "ChainerBackend")])
def test_backend_tables_are_the_backends_options(name, module, cls):
    """[torch], [onnx] and [chainer] list exactly what the backend takes (the run supplies model and
    preset), the chainer one too where chainer is not installed."""
    from multisal.app.config import backend_table
    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    assert set(backend_table(name)) == set(params) - {"self", "model", "preset"}


def test_memory_budget_is_a_size_in_every_backend_table():
    """One type for one option: [onnx] memory_budget took only integers while the backend parsed "2GiB"."""
    for name in ("torch", "onnx", "chainer"):
        assert load_config({name: {"memory_budget": "2GiB"}})[name] == {"memory_budget": "2GiB"}
        with pytest.raises(ConfigError, match=f"config key '{name}.memory_budget': expected a number of bytes"):
            load_config({name: {"memory_budget": "lots"}})
