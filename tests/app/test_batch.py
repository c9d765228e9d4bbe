"""The batch job (multisal.batch): resuming, crash safety, corrupt inputs, batching across images,
and the ray engine against the local one.

Runs use the tiny random classifier ("tiny_models:classifier", tests/tiny_models.py) at 32x32 on
small random photos, so that hundreds of images take seconds.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import multisal as ms
from helpers import assert_agree
from multisal.app.output import OutputFolder
from multisal.app.runs import Manifest
from multisal.files import temporary_name
from multisal.app.cli import main

TESTS = Path(__file__).resolve().parents[1]
METHODS = ["vanilla_gradient", "smoothgrad", "gradcam_pp"]


def _photos(folder, count, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        rgb = np.random.default_rng(i).integers(0, 256, (36, 44, 3), dtype=np.uint8)
        path = folder / f"img{i:04d}.png"
        assert cv2.imwrite(str(path), rgb)
        paths.append(str(path))
    return paths


def _config(inputs, out, **extra):
    cfg = {"model": "tiny_models:classifier", "preset": "raw", "size": [32, 32], "inputs": inputs,
           "output": str(out), "methods": METHODS, "smoothgrad": {"n": 4}}
    cfg.update(extra)
    return cfg


def _records(out):
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]


def _expected_files(methods=METHODS):
    return {"input.png", "grid.png"} | {f"{m}.{ext}" for m in methods for ext in ("npy", "png")}


def _check_complete(out, inputs, methods=METHODS, size=(32, 32), failed=()):
    """Every input: exactly one record, "ok" (but those in `failed`) with a folder holding exactly
    its files, each one valid; nothing temporary left anywhere."""
    records = _records(out)
    assert sorted(r["input"] for r in records) == sorted(inputs)
    assert [r["input"] for r in records if r["status"] != "ok"] == list(failed)
    assert len({r["folder"] for r in records}) == len(records)
    for r in records:
        if r["input"] in failed:
            continue
        folder = Path(out) / r["folder"]
        assert {p.name for p in folder.iterdir()} == _expected_files(methods), folder
        for m in methods:
            saliency = np.load(folder / f"{m}.npy", allow_pickle=False)
            assert saliency.shape == size and np.isfinite(saliency).all()
        for png in folder.glob("*.png"):
            assert cv2.imread(str(png)) is not None, png
    assert not [p for p in Path(out).rglob("*") if p.name.endswith(".tmp")]


def _maps(out):
    return {r["input"]: {m: np.load(Path(out) / r["folder"] / f"{m}.npy") for m in r["methods"]}
            for r in _records(out) if r["status"] == "ok"}


# ---- resuming --------------------------------------------------------------------------------
def test_rerun_skips_what_is_done_and_redoes_what_was_cut_off(tmp_path):
    inputs = _photos(tmp_path / "photos", 12)
    out = tmp_path / "run"
    first = ms.run_batch(_config(inputs, out), progress=False)
    assert first.skipped == 0 and not first.failed
    reference = _maps(out)
    records = _records(out)
    done = {r["input"]: r for r in records}
    stamp = {i: (out / done[i]["folder"] / "smoothgrad.npy").stat().st_mtime_ns for i in inputs}

    # What a crash leaves: the last two images with only the record a run writes for every input
    # before explaining it ("failed", not explained yet; one with a half-written folder), the
    # manifest's last line torn, a temporary file, and an "ok" record whose map was lost.
    lines = (out / "manifest.jsonl").read_text().splitlines()
    not_yet = [json.dumps({"input": i, "status": "failed", "error": "not explained: the run stopped first",
                           "folder": done[i]["folder"], "target": None, "label": None, "backend": "torch",
                           "methods": {}}) for i in inputs[-2:]]
    kept = lines[:-3] + not_yet + [lines[-3][:40]]
    (out / "manifest.jsonl").write_text("\n".join(kept))        # no newline after the torn line
    half = out / done[inputs[-1]]["folder"]
    (half / "grid.png").unlink()
    temporary_name(half / "smoothgrad.npy", OutputFolder(out).tag).write_bytes(b"partial")   # a killed write
    (out / done[inputs[0]]["folder"] / "gradcam_pp.npy").unlink()

    second = ms.run_batch(_config(inputs, out), progress=False)
    redone = {inputs[0], inputs[-3], inputs[-2], inputs[-1]}
    assert second.skipped == len(inputs) - len(redone)
    _check_complete(out, inputs)
    for i in set(inputs) - redone:   # done work is not touched
        assert (out / done[i]["folder"] / "smoothgrad.npy").stat().st_mtime_ns == stamp[i]
    again = _maps(out)
    for i in inputs:                 # and what was redone is the same map
        for m in METHODS:
            assert_agree(again[i][m], reference[i][m])

    third = ms.run_batch(_config(inputs, out), progress=False)
    assert third.skipped == len(inputs) and len(_records(out)) == len(inputs)


def test_a_job_may_grow_and_change_engine_but_not_its_method_options(tmp_path):
    inputs = _photos(tmp_path / "photos", 3)
    out = tmp_path / "run"
    ms.run_batch(_config(inputs[:2], out), progress=False)
    run = ms.run_batch(_config(inputs, out, engine={"batch_size": 2}), progress=False)
    assert run.skipped == 2 and len(_records(out)) == 3
    with pytest.raises(ms.ConfigError, match=r"config key 'smoothgrad': \{\"n\": 5\} differs from \{\"n\": 4\} "
                                             r"in the run already in .*use a new output folder"):
        ms.run_batch(_config(inputs, out, smoothgrad={"n": 5}), progress=False)
    # explain starts over where batch would refuse
    assert ms.run_explain(_config(inputs[:1], out, smoothgrad={"n": 5}), progress=False).skipped == 0
    assert [r["input"] for r in _records(out)] == inputs[:1]


def test_manifest_never_trusts_a_folder_outside_the_run(tmp_path):
    inputs = _photos(tmp_path / "photos", 1)
    out = tmp_path / "run"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    out.mkdir()
    record = {"input": inputs[0], "status": "failed", "folder": "../victim"}
    (out / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    ms.run_batch(_config(inputs, out), progress=False)
    assert (victim / "keep.txt").read_text() == "precious"
    _check_complete(out, inputs)


def test_manifest_reads_past_a_torn_line_and_rewrites_whole_lines(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"input": "a", "status": "failed", "folder": "a"}\n{"input": "b", "sta')
    manifest = Manifest(path)
    assert list(manifest.load()) == ["a"]
    manifest.append({"input": "c", "status": "failed", "folder": "c"})
    manifest.rewrite(["c", "a"])
    assert [json.loads(line)["input"] for line in path.read_text().splitlines()] == ["c", "a"]


# ---- failures ---------------------------------------------------------------------------------
def test_corrupt_images_are_recorded_and_the_job_goes_on(tmp_path, capsys):
    inputs = _photos(tmp_path / "photos", 5)
    corrupt = tmp_path / "photos" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = str(tmp_path / "photos" / "missing.png")
    config = tmp_path / "job.toml"
    config.write_text(f'model = "tiny_models:classifier"\npreset = "raw"\nsize = [32, 32]\n'
                      f'inputs = {json.dumps([str(tmp_path / "photos"), missing])}\n'
                      f'output = "{tmp_path / "run"}"\nmethods = ["vanilla_gradient"]\n[engine]\nbatch_size = 3\n')
    assert main(["batch", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert f"failed: {corrupt}: cannot read image '{corrupt}': cannot identify image file" in captured.err
    assert f"failed: {missing}: image '{missing}' not found" in captured.err
    assert "5 of 7 inputs explained" in captured.out
    by_input = {r["input"]: r for r in _records(tmp_path / "run")}
    assert by_input[str(corrupt)]["status"] == "failed" and all(by_input[i]["status"] == "ok" for i in inputs)
    # a rerun tries the failed ones again (a missing file may have arrived) and skips the rest
    _photos(tmp_path / "arrived", 1)
    os.replace(tmp_path / "arrived" / "img0000.png", missing)
    assert main(["batch", "--config", str(config)]) == 1
    assert "6 of 7 inputs explained (5 done before)" in capsys.readouterr().out


def test_an_image_that_breaks_the_model_fails_alone(tmp_path):
    inputs = _photos(tmp_path / "photos", 4)
    white = tmp_path / "photos" / "white.png"
    cv2.imwrite(str(white), np.full((32, 32, 3), 255, np.uint8))
    cfg = _config(inputs[:2] + [str(white)] + inputs[2:], tmp_path / "run", model="tiny_models:picky",
                  methods=["vanilla_gradient", "gradcam"], engine={"batch_size": 5})
    run = ms.run_batch(cfg, progress=False)
    assert [r["input"] for r in run.failed] == [str(white)]
    assert run.failed[0]["error"] == "_Picky failed on inputs of shape (1, 3, 32, 32): white image"
    _check_complete(tmp_path / "run", inputs + [str(white)], methods=["vanilla_gradient", "gradcam"],
                    failed=[str(white)])


def test_images_explained_together_get_the_maps_they_get_alone(tmp_path):
    inputs = _photos(tmp_path / "photos", 5)
    together = ms.run_batch(_config(inputs, tmp_path / "b5", engine={"batch_size": 5}), progress=False)
    alone = ms.run_batch(_config(inputs, tmp_path / "b1", engine={"batch_size": 1}), progress=False)
    assert [r["target"] for r in together.records] == [r["target"] for r in alone.records]
    a, b = _maps(tmp_path / "b5"), _maps(tmp_path / "b1")
    for i in inputs:
        for m in METHODS:
            assert_agree(a[i][m], b[i][m])


# ---- killed in the middle ---------------------------------------------------------------------
def test_a_job_killed_with_sigkill_finishes_on_rerun(tmp_path):
    inputs = _photos(tmp_path / "photos", 200)
    out = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(f'model = "tiny_models:classifier"\npreset = "raw"\nsize = [32, 32]\n'
                      f'inputs = ["{tmp_path / "photos"}"]\noutput = "{out}"\n'
                      f'methods = ["vanilla_gradient", "gradcam_pp"]\n[engine]\nbatch_size = 4\n')
    command = [sys.executable, "-m", "multisal.app.cli", "batch", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if manifest.exists() and manifest.read_text().count('"status": "ok"') >= 60:
            break
        time.sleep(0.005)
    assert job.poll() is None, f"the job ended before it could be killed: {job.stderr.read().decode()}"
    job.send_signal(signal.SIGKILL)
    job.wait()
    cut = [r for r in _records(out) if r["status"] == "ok"]
    assert 60 <= len(cut) < len(inputs)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"200 of 200 inputs explained ({len(cut)} done before)" in rerun.stdout
    _check_complete(out, inputs, methods=["vanilla_gradient", "gradcam_pp"])


# ---- the ray engine ---------------------------------------------------------------------------
def test_ray_engine_gives_the_local_engines_outputs(tmp_path):
    pytest.importorskip("ray", reason="the ray extra: pip install 'multisal[ray]'")
    inputs = _photos(tmp_path / "photos", 66)
    (tmp_path / "photos" / "corrupt.png").write_bytes(b"not an image")
    all_inputs = [str(tmp_path / "photos")]
    local = ms.run_batch(_config(all_inputs, tmp_path / "local", engine={"batch_size": 8}), progress=False)
    on_ray = ms.run_batch(_config(all_inputs, tmp_path / "ray", engine={"name": "ray", "num_cpus": 2, "actors": 2,
                                                                        "batch_size": 8}), progress=False)
    assert on_ray.engine == "ray" and len(on_ray.records) == len(inputs) + 1
    fields = ("input", "status", "error", "folder", "target", "label")
    assert [[r[f] for f in fields] for r in on_ray.records] == [[r[f] for f in fields] for r in local.records]
    assert [r["input"] for r in on_ray.failed] == [str(tmp_path / "photos" / "corrupt.png")]
    a, b = _maps(tmp_path / "local"), _maps(tmp_path / "ray")
    for i in inputs:
        for m in METHODS:
            assert_agree(b[i][m], a[i][m])
    _check_complete(tmp_path / "ray", inputs + [str(tmp_path / "photos" / "corrupt.png")],
                    failed=[str(tmp_path / "photos" / "corrupt.png")])
