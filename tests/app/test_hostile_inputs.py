"""Hostile and broken inputs on the command line: images that are no images (or not files),
images that decode wrongly unless handled, text files that are not text, weights and models that
break late, backend options that cannot work, configurations past their bounds, models whose
output is NaN and Ray clusters that cannot run the job.

Each case asserts the exit status, the one line on stderr (naming the file, key, option, op or
layer) and that nothing outside the output folder changed (hostile.Untouched). Runs use the tiny
classifier at 32x32, or tiny ONNX graphs built here with onnx.helper.
"""
import json
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hostile import (TINY, Untouched, deadline, expect_error, expect_one_failure, onnx_classifier, photo,
                     run_cli)

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper   # noqa: E402 - after the skip

FAST = [*TINY, "--method", "vanilla_gradient"]


def _records(out):
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "p.png"
    photo(path, 0)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The onnx backend's cache of gradient graphs, out of the user's home."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


def _toml(path, text):
    path.write_text(text)
    return path


# ---- files that are no images ---------------------------------------------------------------------
@pytest.mark.parametrize("content", [
    b"%!PS\n{ } loop\n",
    # with a bounding box, Pillow's EPS plugin opens it and hands it to Ghostscript to render
    # (here: "Unable to locate Ghostscript" where none is installed, a hang where one is)
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n{ } loop\n",
])
def test_postscript_named_png_never_reaches_ghostscript(tmp_path, picture, capsys, content):
    postscript = tmp_path / "loop.png"
    postscript.write_bytes(content)   # Ghostscript would run this for ever
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    with deadline(60):
        expect_one_failure(["explain", picture, postscript, "--out", out, *FAST], capsys, str(postscript),
                           "cannot identify image file")
    untouched.check()
    assert [r["status"] for r in _records(out)] == ["ok", "failed"]   # the other input was explained


def test_a_fifo_as_an_image_list_config_or_labels_file_does_not_block(tmp_path, picture, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    fifo_txt = tmp_path / "list.txt"
    os.mkfifo(fifo_txt)
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    with deadline(60):
        expect_one_failure(["explain", picture, fifo, "--out", out, *FAST], capsys, str(fifo), "not a regular file")
        # a list that is a FIFO is no list: it is an input, refused as one
        expect_one_failure(["explain", picture, fifo_txt, "--out", out, *FAST], capsys, str(fifo_txt),
                           "not a regular file")
        expect_error(["explain", picture, "--config", fifo, "--out", out, *FAST], capsys,
                     f"config file {str(fifo)!r} is not a regular file")
        expect_error(["explain", picture, "--labels", fifo, "--out", out, *FAST], capsys,
                     "config key 'labels'", repr(str(fifo)), "not a regular file")
    untouched.check()


def test_dev_zero_as_config_labels_or_list(tmp_path, picture, capsys):
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    with deadline(60):
        expect_error(["explain", picture, "--config", "/dev/zero", "--out", out], capsys,
                     "config file '/dev/zero' is not a regular file")
        expect_error(["explain", picture, "--labels", "/dev/zero", "--out", out, *FAST], capsys,
                     "config key 'labels'", "'/dev/zero' is not a regular file")
        expect_one_failure(["explain", picture, "/dev/zero", "--out", out, *FAST], capsys, "/dev/zero",
                           "not a regular file")
    untouched.check()
    assert not (tmp_path / "out" / "zero").exists()


@pytest.mark.parametrize("option", ["--config", "--labels", "list"])
def test_text_files_that_are_not_utf8(tmp_path, picture, capsys, option):
    latin1 = tmp_path / ("list.txt" if option == "list" else "file.txt")
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    argv = [latin1] if option == "list" else [picture, option, latin1]
    expect_error(["explain", *argv, "--out", out, *FAST], capsys, repr(str(latin1)), "is not UTF-8 text (byte 3)")
    untouched.check()
    assert not out.exists()


# ---- images that decode wrongly unless handled ------------------------------------------------------
def test_deep_palette_and_rotated_images_become_8_bit_rgb_by_their_range(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    ramp = np.tile(np.linspace(0, 1, 40), (30, 1))
    # 16-bit PNG using the low 4096 levels (a 12-bit camera): clipped to 8 bits it is nearly all white
    Image.fromarray((ramp * 4095).astype(np.uint16)).save(photos / "deep16.png")
    Image.fromarray((ramp * 2e9 - 1e9).astype(np.int32)).save(photos / "int32.tif")
    Image.fromarray((ramp * 0.01).astype(np.float32)).save(photos / "float.tif")   # clipped: all black
    palette = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (30, 10)), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * 756)
    palette.save(photos / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6   # stored landscape, shown rotated 90 degrees clockwise
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(photos / "rotated.jpg", exif=exif)
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    code, _, err = run_cli(["explain", photos, "--out", out, *FAST], capsys)
    assert (code, err) == (0, [])
    untouched.check()
    shown = {Path(r["input"]).name: np.asarray(Image.open(out / r["folder"] / "input.png")) for r in _records(out)}
    for name in ("deep16.png", "int32.tif", "float.tif"):
        grey = shown[name][:, :, 0]
        assert shown[name].shape == (30, 40, 3) and grey.min() == 0 and grey.max() == 255, name
        assert np.abs(grey[0].astype(int) - np.rint(np.linspace(0, 255, 40))).max() <= 1, name
    assert [tuple(shown["palette.png"][0, i]) for i in range(4)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255),
                                                                     (255, 255, 0)]
    assert shown["rotated.jpg"].shape == (40, 20, 3)   # upright


# ---- weights and models that break late ----------------------------------------------------------------
def test_a_zero_byte_weights_file(tmp_path, picture, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    expect_error(["explain", picture, "--model", "tiny_models:unseeded", "--weights", empty, "--preset", "raw",
                  "--out", out], capsys, f"weights {str(empty)!r}")
    expect_error(["explain", picture, "--model", "efficientnet-lite0", "--weights", empty, "--out", out], capsys,
                 f"weights {str(empty)!r} cannot be read")
    untouched.check()
    assert not out.exists()


def test_an_npz_whose_member_is_not_an_array(tmp_path, picture, capsys):
    weights = tmp_path / "vgg.npz"
    np.savez(weights, **{"conv1_1/W": np.array([{"not": "an array"}], dtype=object)}, allow_pickle=True)
    assert zipfile.is_zipfile(weights)
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    expect_error(["explain", picture, "--model", "vgg16-chainer", "--weights", weights, "--out", out], capsys,
                 repr(str(weights)), "'conv1_1/W' cannot be read")
    untouched.check()


@pytest.mark.parametrize("table, names", [
    ('[torch]\ndevice = "meta"\n', ["device 'meta'", "expected 'cpu', 'cuda'"]),
    ('[torch]\ndevice = "mps"\n' if not torch.backends.mps.is_available() else '[torch]\ndevice = "cuda:99"\n',
     ["is not usable by torch"]),
    ('[torch]\ndevice = "warp-drive"\n', ["device 'warp-drive'"]),
])
def test_torch_devices_that_cannot_run_the_model(tmp_path, picture, capsys, table, names):
    config = _toml(tmp_path / "job.toml", table)
    out = tmp_path / "out"
    untouched = Untouched(tmp_path)
    expect_error(["explain", picture, "--config", config, "--out", out, *FAST], capsys, *names)
    untouched.check()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(onnx_classifier(), str(path))
    return path


ONNX_RUN = ["--backend", "onnx", "--preset", "raw", "--size", "8", "8", "--method", "vanilla_gradient,gradcam"]


def test_onnx_providers_empty_or_unknown(tmp_path, picture, tiny_onnx, cache, capsys):
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out, cache)
    for value, names in (("[]", ["providers=[]", "expected a non-empty list"]),
                         ('["NoSuchExecutionProvider"]', ["'NoSuchExecutionProvider' is not available"])):
        config = _toml(tmp_path / "job.toml", f"[onnx]\nproviders = {value}\n")
        expect_error(["explain", picture, "--config", config, "--model", tiny_onnx, *ONNX_RUN, "--out", out], capsys,
                     *names)
        config.unlink()
    untouched.check()


def test_onnx_cache_dir_that_is_a_file(tmp_path, picture, tiny_onnx, capsys):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    config = _toml(tmp_path / "job.toml", f"[onnx]\ncache_dir = {json.dumps(str(blocker))}\n")
    out = tmp_path / "out"
    untouched = Untouched(tmp_path)
    expect_error(["explain", picture, "--config", config, "--model", tiny_onnx, *ONNX_RUN, "--out", out], capsys,
                 f"cache_dir {str(blocker)!r} is not a folder")
    untouched.check()


def test_a_corrupt_cached_gradient_graph_is_rebuilt(tmp_path, picture, tiny_onnx, cache, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(["explain", picture, "--model", tiny_onnx, *ONNX_RUN, "--out", first], capsys)[0] == 0
    graphs = sorted((cache / "multisal" / "onnx").glob("*.onnx"))
    assert graphs
    for path in graphs:   # a torn write, a full disk, someone's editor
        path.write_bytes(b"garbage" * 10)
    untouched = Untouched(tmp_path, second, cache)
    for _ in range(2):    # and not only once: the rebuilt entry replaced the garbage
        code, _, err = run_cli(["explain", picture, "--model", tiny_onnx, *ONNX_RUN, "--out", second], capsys)
        assert (code, err) == (0, [])
    untouched.check()
    assert all(path.read_bytes() != b"garbage" * 10 for path in graphs)
    for method in ("vanilla_gradient", "gradcam"):
        np.testing.assert_array_equal(np.load(second / "p" / f"{method}.npy"), np.load(first / "p" / f"{method}.npy"))


def _external(folder, key, value):
    """tiny.onnx with its weights in external data, one field of the weight's entry set to value."""
    folder.mkdir(exist_ok=True)
    onnx.save(onnx_classifier(), str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    entries = {e.key: e for e in tensor.external_data}
    entry = entries.get(key) or tensor.external_data.add()
    entry.key, entry.value = key, value
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    return folder / "m.onnx"


def _huge_constant():
    # 4e18 bytes of zeros, summed and added: onnxruntime must fail to allocate, not try.
    shape = numpy_helper.from_array(np.array([10 ** 6] * 3, np.int64), "huge.shape")
    nodes = [helper.make_node("ConstantOfShape", ["huge.shape"], ["huge"],
                              value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("ReduceSum", ["huge"], ["huge.sum"], keepdims=0),
             helper.make_node("Add", ["features", "huge.sum"], ["summed"])]
    return onnx_classifier(nodes=nodes, initializers=[shape], last="summed")


ONNX_CASES = {
    "external data longer than its file": (lambda d: _external(d, "length", str(10 ** 6)),
                                           ["cannot read its external data", "exceeds available data",
                                            "'conv.weight'"]),
    "external data at a negative offset": (lambda d: _external(d, "offset", "-8"),
                                           ["cannot read its external data", "non-negative", "'conv.weight'"]),
    "external data outside its folder": (lambda d: _external(d, "location", "../../etc/passwd"),
                                         ["'../../etc/passwd' outside the model's folder"]),
    "a custom op": (lambda d: onnx_classifier(nodes=[helper.make_node("MyOp", ["features"], ["custom"],
                                                                      domain="com.example")],
                                              last="custom", extra_opsets=[("com.example", 1)]),
                    ["com.example:MyOp"]),
    "opset 99": (lambda d: onnx_classifier(opset=99), ["Opset 99"]),
    "an integer input": (lambda d: onnx_classifier(input_type=TensorProto.INT64), ["'input' is int64"]),
    "a huge ConstantOfShape": (lambda d: _huge_constant(), ["op ConstantOfShape", "Failed to allocate memory"]),
    "not an onnx file": (lambda d: (d / "m.onnx").write_bytes(b"\x00garbage") and d / "m.onnx",
                         ["cannot read ONNX model"]),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_files_that_fail_after_the_checker(tmp_path, picture, cache, capsys, case):
    make, names = ONNX_CASES[case]
    folder = tmp_path / "model"
    folder.mkdir()
    made = make(folder)
    path = made if isinstance(made, Path) else folder / "m.onnx"
    if not isinstance(made, Path):
        onnx.save(made, str(path))
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, cache)
    with deadline(120):
        expect_error(["explain", picture, "--model", path, *ONNX_RUN, "--out", out], capsys, str(path), *names)
        expect_error(["layers", path, "--shape", "3", "8", "8"], capsys, str(path), *names)
        expect_error(["export-grad", path, tmp_path / "grad" / "g.onnx", "--shape", "3", "8", "8"], capsys,
                     str(path), *names)
    untouched.check()


def test_layers_shape_out_of_range(capsys):
    for shape in (["0", "0", "0"], ["3", "-1", "8"], ["3", "9000", "8"], ["3", "x", "8"]):
        expect_error(["layers", "tiny_models:classifier", "--shape", *shape], capsys, "argument --shape",
                     "--help")


# ---- models whose output is NaN ------------------------------------------------------------------------
def test_a_model_that_gives_nan_for_one_input_fails_that_input(tmp_path, picture, capsys):
    white = tmp_path / "white.png"
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(white)
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    expect_one_failure(["explain", picture, white, "--model", "tiny_models:nan_on_white", "--preset", "raw",
                        "--size", "32", "32", "--method", "vanilla_gradient,smoothgrad,gradcam", "--out", out],
                       capsys, str(white), "NaN or infinite")
    untouched.check()

    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")

    text = (out / "manifest.jsonl").read_text()
    records = [json.loads(line, parse_constant=strict) for line in text.splitlines()]
    assert [r["status"] for r in records] == ["ok", "failed"]
    for name in ("vanilla_gradient", "smoothgrad", "gradcam"):
        assert np.isfinite(np.load(out / records[0]["folder"] / f"{name}.npy")).all()
    assert not (out / "white").exists()


def test_a_model_whose_output_is_always_nan_is_refused_before_writing(tmp_path, picture, capsys):
    out = tmp_path / "out"
    untouched = Untouched(tmp_path)
    expect_error(["explain", picture, "--model", "tiny_models:always_nan", "--preset", "raw", "--size", "32", "32",
                  "--out", out], capsys, "NaN or infinite")
    untouched.check()


# ---- configurations past their bounds -----------------------------------------------------------------
@pytest.mark.parametrize("table, key", [
    ("[smoothgrad]\nn = 1000000000\n", "'smoothgrad.n': 1000000000 is over the limit of 100000 noisy samples"),
    ("[smooth_gradcam_pp]\nn = 1000000\n", "'smooth_gradcam_pp.n': 1000000 is over the limit"),
    ("[integrated_gradients]\nsteps = 1000000\n", "'integrated_gradients.steps': 1000000 is over the limit"),
    ("[smoothgrad]\nmax_n = 1000000\n", "'smoothgrad.max_n': 1000000 is over the limit"),
    ("size = [9000, 9000]\n", "'size': expected [height, width], integers 1..8192"),
    ("[smooth_gradcam_pp]\nfilters = []\n", "'smooth_gradcam_pp.filters': expected a non-empty list"),
    ('[smoothgrad]\nn = nan\n', "'smoothgrad.n'"),
    ("[engine]\nbatch_size = 0\n", "'engine.batch_size': expected an integer >= 1"),
])
def test_configuration_values_past_their_bounds(tmp_path, picture, capsys, table, key):
    config = _toml(tmp_path / "job.toml", 'model = "tiny_models:classifier"\npreset = "raw"\n' + table)
    out = tmp_path / "out"
    untouched = Untouched(tmp_path)
    expect_error(["batch", picture, "--config", config, "--out", out], capsys, "config key " + key)
    untouched.check()


def test_an_unknown_target_name_says_which_names_are_close(tmp_path, picture, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\nfrog\n")
    out = tmp_path / "out"
    untouched = Untouched(tmp_path)
    expect_error(["explain", picture, *FAST, "--labels", labels, "--target", "dgo", "--out", out], capsys,
                 "config key 'target'", '"dgo"', 'closest: "dog"')
    untouched.check()


# ---- Ray clusters that cannot run the job ------------------------------------------------------------
def test_ray_gpus_that_are_not_there_and_an_unreachable_address(tmp_path, picture, capsys):
    pytest.importorskip("ray", reason="the ray extra: pip install 'multisal[ray]'")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: an actor asking for one would run")
    out = tmp_path / "out"
    config = _toml(tmp_path / "job.toml", "[engine]\nname = \"ray\"\nnum_cpus = 1\ngpus_per_actor = 1\n")
    untouched = Untouched(tmp_path, config)
    with deadline(120):
        expect_error(["batch", picture, "--config", config, "--out", out, *FAST], capsys,
                     "config key 'engine.gpus_per_actor': 1 asked for, but the Ray cluster has 0 GPUs")
    # 127.0.0.1 on a port nothing listens on (one just bound and released): refused in seconds
    # (ray.init itself retries for over ten minutes), before anything is written
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config.write_text(f"[engine]\nname = \"ray\"\naddress = \"127.0.0.1:{port}\"\n")
    with deadline(60):
        expect_error(["batch", picture, "--config", config, "--out", out, *FAST], capsys,
                     "config key 'engine.address'", f"no Ray cluster answers at 127.0.0.1:{port}", "refused")
    untouched.check()
    assert not out.exists()
