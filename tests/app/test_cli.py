"""The `multisal` command: explain's output layout, exit codes (0, 1 with failures listed, 2 for bad
usage or configuration), config files and overrides, the model sources (models/ names, factories,
state dicts, TorchScript, .onnx), the SmoothGrad progression, help texts and the examples.

Most runs use a tiny random classifier ("tiny_models:classifier", tests/tiny_models.py) at 32x32;
only the examples test runs EfficientNet-Lite0."""
import inspect
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import multisal as ms
from multisal.methods import DEFAULT_METHODS
import tiny_models
from helpers import assert_agree
from multisal.app.cli import main
from multisal.app.config import tomllib   # the standard library's, or tomli before Python 3.11
from multisal.app.inputs import expand_inputs, folder_names
from multisal.app.job import PROGRESSION, smoothgrad_progression

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny_models:classifier", "--preset", "raw", "--size", "32", "32"]
# The methods a run gives a layer: those that take one.
CAM = {name for name, method in ms.METHODS.items() if "layer" in inspect.signature(method).parameters}


def _photo(path, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])
    return rgb


@pytest.fixture
def images(tmp_path):
    """Two readable photos, a corrupt file and a missing one."""
    _photo(tmp_path / "one.png", 0)
    _photo(tmp_path / "two.jpg", 1)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return [str(tmp_path / n) for n in ("one.png", "two.jpg", "corrupt.png", "missing.png")]


def _manifest(out):
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]


def test_explain_writes_every_output_and_lists_failures(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["explain", *images, *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"multisal: failed: {images[2]}: cannot read image '{images[2]}': cannot identify image file '{images[2]}'",
                   f"multisal: failed: {images[3]}: image '{images[3]}' not found"]
    records = _manifest(out)
    assert [(r["input"], r["status"], r["folder"]) for r in records] == [
        (images[0], "ok", "one"), (images[1], "ok", "two"), (images[2], "failed", "corrupt"), (images[3], "failed", "missing")]
    assert records[2]["error"].startswith("cannot read image") and records[0]["error"] is None
    for r in records[:2]:
        assert r["backend"] == "torch" and r["label"] == f"class {r['target']}" and len(r["top5"]) == 5
        assert list(r["methods"]) == list(DEFAULT_METHODS)       # no methods named: the default set
        for name, m in r["methods"].items():
            assert m["files"] == [f"{name}.npy", f"{name}.png"] and m["seconds"] >= 0
            assert ("layer" in m) == (name in CAM)
            for f in m["files"] + ["grid.png", "input.png"]:
                assert (out / r["folder"] / f).is_file()
        grid = cv2.imread(str(out / r["folder"] / "grid.png"))
        assert grid.shape[1] == 224 * (1 + len(DEFAULT_METHODS))     # the photo, then one column per method
    assert not (out / "corrupt").exists()
    assert (out / "index.html").is_file()
    # The maps are the Python API's maps for the same image, target and settings.
    be = ms.load_backend({"model": "tiny_models:classifier", "preset": "raw", "size": [32, 32]})
    x = be.preset.apply(images[0])
    target = records[0]["target"]
    assert target == int(be.predict(x).argmax())
    np.testing.assert_allclose(np.load(out / "one" / "vanilla_gradient.npy"), ms.vanilla_gradient(be, x, target)[0], rtol=1e-5)
    np.testing.assert_allclose(np.load(out / "one" / "gradcam.npy"), ms.gradcam(be, x, target)[0], rtol=1e-5, atol=1e-6)
    assert np.load(out / "one" / "integrated_gradients.npy").shape == (3, 32, 32)
    # config.toml is the resolved configuration, and runs again to the same maps.
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["inputs"] == images and cfg["preset"] == "raw" and cfg["size"] == [32, 32]
    again = tmp_path / "again"
    assert main(["explain", "--config", str(out / "config.toml"), "--out", str(again), images[0]]) == 0
    assert np.array_equal(np.load(again / "one" / "smoothgrad.npy"), np.load(out / "one" / "smoothgrad.npy"))


def test_config_file_with_overrides(tmp_path, capsys):
    _photo(tmp_path / "p.png", 2)
    config = tmp_path / "c.toml"
    config.write_text(f'model = "tiny_models:classifier"\npreset = "raw"\nsize = [32, 32]\n'
                      f'inputs = ["{tmp_path / "p.png"}"]\noutput = "{tmp_path / "from-file"}"\n'
                      'methods = ["gradcam"]\ntarget = 2\n[gradcam]\nlayer = "1"\n')
    assert main(["explain", "--config", str(config)]) == 0
    record, = _manifest(tmp_path / "from-file")
    assert record["target"] == 2 and list(record["methods"]) == ["gradcam"] and record["methods"]["gradcam"]["layer"] == "1"
    out = tmp_path / "cli"
    assert main(["explain", "--config", str(config), "--out", str(out), "--method", "vanilla_gradient,gradcam",
                 "--target", "4", "--layer", "3"]) == 0
    record, = _manifest(out)
    assert record["target"] == 4 and list(record["methods"]) == ["vanilla_gradient", "gradcam"]
    assert record["methods"]["gradcam"]["layer"] == "3"
    assert sorted(p.name for p in (out / "p").glob("*.npy")) == ["gradcam.npy", "vanilla_gradient.npy"]
    assert "report: " + str(out / "index.html") in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--size", "32", "32", "--preset", "raw", "--model", "tiny_models:classifier", "--target", "9"],
     "config key 'target': expected a class index 0..4 or a class name, got 9"),
    (TINY + ["--layer", "7"], "config key 'layer': expected a layer of the model"),
    (TINY + ["--layer", "5"], "config key 'layer': expected a layer with a 4-D (N,C,H,W) activation, got \"5\" of shape (1, 6)"),
    (TINY + ["--method", "lime"], "config key 'methods': expected a non-empty list of distinct methods"),
    (["--model", "tiny_models:classifier"], "config key 'preset': missing"),
    (TINY[:2] + ["--preset", "raw", "--size", "0", "32"], "config key 'size': expected [height, width]"),
    (["--model", "tiny_models:not_a_module", "--preset", "raw"],
     "model 'tiny_models:not_a_module': the factory returned int; the torch backend needs an nn.Module"),
    (["--model", "no_such_module:make", "--preset", "raw"], "model 'no_such_module:make': cannot import 'no_such_module'"),
])
def test_bad_configuration_exits_2_with_one_line(tmp_path, capsys, argv, message):
    _photo(tmp_path / "p.png", 3)
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "p.png"), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("multisal: error: " + message), err
    assert not out.exists()                                      # nothing written before the set-up succeeded


def test_bad_usage_and_missing_inputs_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["explain", "x.png", "--no-such-option"])
    assert info.value.code == 2
    assert main(["explain", *TINY]) == 2
    assert "config key 'inputs': no images given" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[smoothgrad]\nn = "fifty"\n')
    assert main(["explain", "x.png", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == "multisal: error: config key 'smoothgrad.n': expected an integer >= 1 or \"auto\", got \"fifty\"\n"


@pytest.mark.parametrize("command", ["explain", "demo", "layers", "methods", "export-grad"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    epilog = re.search(r"^examples?:", text, re.M)
    assert epilog and f"multisal {command}" in text[epilog.start():]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")   # TorchScript is deprecated, still supported
def test_model_sources_state_dict_and_torchscript(tmp_path, capsys):
    _photo(tmp_path / "p.png", 4)
    weights, script = tmp_path / "w.pt", tmp_path / "script.pt"
    net = tiny_models.classifier()
    torch.save(net.state_dict(), weights)
    torch.jit.save(torch.jit.script(net), script)
    runs = {
        "factory": ["--model", "tiny_models:classifier"],
        "state dict": ["--model", "tiny_models:unseeded", "--weights", str(weights)],
        "torchscript": ["--model", str(script)],
    }
    for name, argv in runs.items():
        out = tmp_path / name.replace(" ", "_")
        assert main(["explain", str(tmp_path / "p.png"), *argv, "--preset", "raw", "--size", "32", "32",
                     "--method", "vanilla_gradient,smoothgrad", "--out", str(out)]) == 0, capsys.readouterr().err
    for name in ("state_dict", "torchscript"):
        for method in ("vanilla_gradient", "smoothgrad"):
            np.testing.assert_allclose(np.load(tmp_path / name / "p" / f"{method}.npy"),
                                       np.load(tmp_path / "factory" / "p" / f"{method}.npy"), rtol=1e-5, atol=1e-7)
    # The unseeded factory alone gives other maps: the weights really were loaded above.
    assert main(["explain", str(tmp_path / "p.png"), "--model", "tiny_models:unseeded", "--preset", "raw", "--size", "32",
                 "32", "--method", "vanilla_gradient", "--out", str(tmp_path / "unseeded")]) == 0
    assert not np.allclose(np.load(tmp_path / "unseeded" / "p" / "vanilla_gradient.npy"),
                           np.load(tmp_path / "factory" / "p" / "vanilla_gradient.npy"))
    capsys.readouterr()
    assert main(["explain", str(tmp_path / "p.png"), "--model", str(weights), "--preset", "raw"]) == 2
    assert "is a state dict without an architecture: give model = 'package.module:factory' and weights" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "p.png"), "--model", str(script), "--preset", "raw", "--method", "gradcam"]) == 2
    assert "no 4-D activation" in capsys.readouterr().err         # TorchScript hides its layers


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(tiny_models.classifier(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True,
                      input_names=["input"], output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},),
                      verbose=False)
    return path


def test_onnx_file_gives_the_torch_maps(tiny_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _photo(tmp_path / "p.png", 5)
    methods = "vanilla_gradient,smoothgrad,gradcam_pp"
    assert main(["explain", str(tmp_path / "p.png"), *TINY, "--method", methods, "--out", str(tmp_path / "t")]) == 0
    assert main(["explain", str(tmp_path / "p.png"), "--backend", "onnx", "--model", str(tiny_onnx), "--preset", "raw",
                 "--size", "32", "32", "--method", methods, "--out", str(tmp_path / "o")]) == 0
    (t,), (o,) = _manifest(tmp_path / "t"), _manifest(tmp_path / "o")
    assert o["backend"] == "onnx" and o["target"] == t["target"]
    for method in methods.split(","):
        assert_agree(np.load(tmp_path / "o" / "p" / f"{method}.npy"), np.load(tmp_path / "t" / "p" / f"{method}.npy"))
    capsys.readouterr()
    assert main(["layers", str(tiny_onnx)]) == 0
    assert "(default)" in capsys.readouterr().out


def test_progression_is_one_pass_of_smoothgrad(tmp_path):
    be = ms.load_backend({"model": "tiny_models:classifier", "preset": "raw", "size": [32, 32]})
    x = be.preset.apply(_photo(tmp_path / "p.png", 6))
    options = {"noise_level": 0.3, "seed": 5, "channel_reduce": "mean"}
    samples = []
    run = be.run
    be.run = lambda batch, *a, **k: (samples.append(len(batch)), run(batch, *a, **k))[1]
    maps = smoothgrad_progression(be, x, 1, options)
    be.run = run
    assert sum(samples) == 100 and maps.shape == (len(PROGRESSION), 32, 32)
    for i, k in enumerate(PROGRESSION):
        np.testing.assert_allclose(maps[i], ms.smoothgrad(be, x, 1, n=k, **options)[0], rtol=1e-5, atol=1e-8)
    # The command line writes it beside the other outputs.
    out = tmp_path / "run"
    assert main(["explain", str(tmp_path / "p.png"), *TINY, "--method", "gradcam", "--progression", "--out", str(out)]) == 0
    record, = _manifest(out)
    assert record["progression"]["samples"] == list(PROGRESSION)
    assert np.load(out / "p" / "progression.npy").shape == (len(PROGRESSION), 32, 32)
    assert cv2.imread(str(out / "p" / "progression.png")).shape[1] == 224 * (1 + len(PROGRESSION))


def test_inputs_folders_globs_lists_and_unique_folders(tmp_path):
    (tmp_path / "dir").mkdir()
    for name in ("b.png", "a.jpg", "notes.md"):
        (tmp_path / "dir" / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# photos\ndir/a.jpg\n\nskimage:coffee\n")
    found = expand_inputs([str(tmp_path / "dir"), str(tmp_path / "dir" / "*.png"), str(tmp_path / "list.txt"),
                           "skimage:chelsea", str(tmp_path / "none*.png")])
    d = str(tmp_path / "dir")
    assert found == [f"{d}/a.jpg", f"{d}/b.png", f"{d}/b.png", f"{d}/a.jpg", "skimage:coffee", "skimage:chelsea",
                     str(tmp_path / "none*.png")]
    assert folder_names(found) == ["a", "b", "b-2", "a-2", "coffee", "chelsea", "none"]
    assert folder_names(["x/A.png", "y/a.png", "<s>&.png", "....png"]) == ["A", "a-2", "s", "input"]


def test_class_names_from_a_labels_file(tmp_path, capsys):
    _photo(tmp_path / "p.png", 7)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\nfrog\n")
    out = tmp_path / "run"
    assert main(["explain", str(tmp_path / "p.png"), *TINY, "--labels", str(labels), "--target", "Fish",
                 "--method", "gradcam", "--out", str(out)]) == 0
    record, = _manifest(out)
    assert (record["target"], record["label"]) == (3, "fish")
    labels.write_text("cat\ndog\n")
    assert main(["explain", str(tmp_path / "p.png"), *TINY, "--labels", str(labels), "--out", str(out)]) == 2
    assert "config key 'labels': " in capsys.readouterr().err
    labels.write_text("cat\ndog\nbird\nfish\nfrog\n")                  # a near miss names the class it is near
    assert main(["explain", str(tmp_path / "p.png"), *TINY, "--labels", str(labels), "--target", "fihs",
                 "--method", "gradcam", "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("multisal: error: config key 'target':") and '"fish"' in err[0], err


def test_layers_and_methods_commands(capsys):
    assert main(["layers", "tiny_models:classifier", "--shape", "3", "32", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2", "3"] and lines[-1].endswith("(default)")
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # One line per METHODS entry, in its order: the name, then a summary of its own.
    assert [line.split()[0] for line in lines] == list(ms.METHODS)
    summaries = [line.split(None, 1)[1] for line in lines]
    assert len(set(summaries)) == len(summaries), summaries
    for summary, fn in zip(summaries, ms.METHODS.values()):
        assert summary == fn.__doc__.strip().splitlines()[0] and len(summary) > 40, summary


def test_examples_run_on_both_backends(tmp_path, monkeypatch):
    """The shipped torch and onnx examples, on one photo and one method: the same class and map."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # the onnx export starts from scratch
    for backend in ("torch", "onnx"):
        assert main(["explain", "skimage:chelsea", "--config", str(ROOT / "examples" / f"{backend}.toml"),
                     "--method", "gradcam_pp", "--out", str(tmp_path / backend)]) == 0
    (t,), (o,) = _manifest(tmp_path / "torch"), _manifest(tmp_path / "onnx")
    assert (t["target"], t["label"]) == (o["target"], o["label"]) == (285, "Egyptian cat")
    assert_agree(np.load(tmp_path / "onnx" / "chelsea" / "gradcam_pp.npy"),
                 np.load(tmp_path / "torch" / "chelsea" / "gradcam_pp.npy"))


def test_run_explain_from_python(tmp_path):
    rgb = _photo(tmp_path / "p.png", 8)
    config = {"model": "tiny_models:classifier", "preset": "raw", "size": [32, 32], "methods": ["gradcam"],
              "inputs": [str(tmp_path / "p.png"), "skimage:no_such_photo"], "output": str(tmp_path / "out")}
    run = ms.run_explain(config, progress=False)
    assert run.report == tmp_path / "out" / "index.html" and run.report.is_file()
    assert [r["status"] for r in run.records] == ["ok", "failed"]
    assert run.failed[0]["error"].startswith("unknown scikit-image photo 'no_such_photo': expected one of astronaut,")
    assert cv2.imread(str(tmp_path / "out" / "p" / "input.png")).shape == rgb.shape   # small photos keep their size
    with pytest.raises(ms.ConfigError, match="config key 'inputs': no images given"):
        ms.run_explain(dict(config, inputs=[]))
