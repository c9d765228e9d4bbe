"""A backend written outside multisal (tests/numpy_backend.py) and registered in one place works
everywhere a backend name does, with no other edit: ms.load_backend, a TOML configuration with its
own table of options (validated from its __init__'s signature), `multisal explain`, `multisal
batch`, `multisal layers` and the Ray engine, whose actors receive it from the driver."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import multisal as ms
import numpy_backend as nb
from helpers import assert_agree
from multisal.app.cli import main

MODEL = "numpy_backend:classifier"
METHODS = ["vanilla_gradient", "smoothgrad", "gradcam"]


@pytest.fixture
def photos(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / "photos" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        assert cv2.imwrite(str(path), np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def _toml(path, out, inputs, table="memory_budget = \"1MiB\"\n", engine=""):
    path.write_text(f'backend = "numpy"\nmodel = "{MODEL}"\npreset = "raw"\nsize = [8, 8]\n'
                    f'inputs = {json.dumps(inputs)}\noutput = "{out}"\nmethods = {json.dumps(METHODS)}\n'
                    f'[smoothgrad]\nn = 3\n[numpy]\n{table}{engine}')
    return path


def _records(out):
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]


def test_load_backend_by_name_and_from_a_configuration(numpy_backend_class, tmp_path):
    be = ms.load_backend("numpy", model=nb.classifier(), memory_budget="2KiB")
    assert type(be) is numpy_backend_class and be.memory_budget == 2048
    with pytest.raises(ms.MultisalError, match="^load_backend\\('numpy'\\): unknown option 'device'; backend 'numpy' "
                                               "takes memory_budget, float64$"):
        ms.load_backend("numpy", model=nb.classifier(), device="cpu")
    from_file = ms.load_backend(str(_toml(tmp_path / "c.toml", tmp_path / "out", [], table="float64 = true\n")))
    assert type(from_file) is numpy_backend_class and from_file.float64 and from_file.preset.name == "raw"
    x = from_file.preset.apply(np.zeros((9, 7, 3), np.uint8) + 100)
    assert x.shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(from_file.predict(x), nb.classifier()(x))


@pytest.mark.parametrize("table, message", [
    ('memory_budget = "lots"\n',
     "config key 'numpy.memory_budget': expected a number of bytes >= 1 or a size such as \"2GiB\", got \"lots\""),
    ("float64 = 1\n", "config key 'numpy.float64': expected true or false, got 1"),
    ('device = "cpu"\n', "config key 'numpy.device': unknown key (value \"cpu\"); [numpy] accepts memory_budget, float64"),
])
def test_its_table_is_checked_against_its_signature(numpy_backend_class, tmp_path, table, message, capsys):
    config = _toml(tmp_path / "c.toml", tmp_path / "out", ["x.png"], table=table)
    with pytest.raises(ms.ConfigError) as info:
        ms.load_config(config)
    assert str(info.value) == message
    assert main(["explain", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"multisal: error: {message}\n"


def test_models_it_cannot_open_are_one_line_errors(numpy_backend_class, tmp_path):
    with pytest.raises(ms.ConfigError, match="^config key 'model': \"efficientnet-lite0\" is a models/ name, which "
                                             "backend \"numpy\" does not run$"):
        ms.load_config({"backend": "numpy", "model": "efficientnet-lite0"})
    with pytest.raises(ms.MultisalError, match="^model .builtins:dict.: the factory returned dict, not a "
                                               "NumpyNet$"):
        ms.load_backend({"backend": "numpy", "model": "builtins:dict", "preset": "raw"})


def test_explain_batch_and_layers_on_the_command_line(numpy_backend_class, photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["explain", *photos[:2], "--backend", "numpy", "--model", MODEL, "--preset", "raw", "--size", "8", "8",
                 "--method", ",".join(METHODS), "--out", str(out)]) == 0
    records = _records(out)
    assert [(r["status"], r["backend"]) for r in records] == [("ok", "numpy")] * 2
    # The maps are the Python API's for the same image and target.
    be = ms.load_backend({"backend": "numpy", "model": MODEL, "preset": "raw", "size": [8, 8]})
    x = be.preset.apply(photos[0])
    assert records[0]["target"] == int(be.predict(x).argmax())
    assert records[0]["methods"]["gradcam"]["layer"] == "relu2"
    np.testing.assert_allclose(np.load(out / records[0]["folder"] / "gradcam.npy"), ms.gradcam(be, x)[0], rtol=1e-6)
    np.testing.assert_allclose(np.load(out / records[0]["folder"] / "vanilla_gradient.npy"),
                               ms.vanilla_gradient(be, x)[0], rtol=1e-6)

    config = _toml(tmp_path / "job.toml", tmp_path / "batch", photos, engine="[engine]\nbatch_size = 2\n")
    capsys.readouterr()
    assert main(["batch", "--config", str(config)]) == 0
    assert "5 of 5 inputs explained" in capsys.readouterr().out
    assert main(["batch", "--config", str(config)]) == 0
    assert "5 of 5 inputs explained (5 done before)" in capsys.readouterr().out

    assert main(["layers", MODEL, "--backend", "numpy", "--shape", "3", "8", "8"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    # Each candidate with its layout and grid (a backend without layer records reads them as NCHW).
    assert listed == [["conv1", "4x8x8", "nchw", "8x8"], ["bn1", "4x8x8", "nchw", "8x8"],
                      ["relu1", "4x8x8", "nchw", "8x8"], ["conv2", "6x8x8", "nchw", "8x8"],
                      ["relu2", "6x8x8", "nchw", "8x8", "(default)"]]


def test_the_ray_engine_ships_it_to_its_actors(numpy_backend_class, photos, tmp_path):
    pytest.importorskip("ray", reason="the ray extra: pip install 'multisal[ray]'")
    local = ms.run_batch(str(_toml(tmp_path / "local.toml", tmp_path / "local", photos)), progress=False)
    # The actors import nothing that registers the backend: only what the driver ships them does.
    on_ray = ms.run_batch(str(_toml(tmp_path / "ray.toml", tmp_path / "ray", photos,
                                    engine='[engine]\nname = "ray"\nnum_cpus = 2\nactors = 2\nbatch_size = 2\n')),
                          progress=False)
    assert on_ray.engine == "ray" and not on_ray.failed and len(on_ray.records) == len(photos)
    fields = ("input", "status", "folder", "target", "backend")
    assert [[r[f] for f in fields] for r in on_ray.records] == [[r[f] for f in fields] for r in local.records]
    for a, b in zip(local.records, on_ray.records):
        for method in METHODS:
            assert_agree(np.load(tmp_path / "ray" / b["folder"] / f"{method}.npy"),
                         np.load(tmp_path / "local" / a["folder"] / f"{method}.npy"))
