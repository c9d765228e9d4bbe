"""The explain command with a detection target: `target = {detection = {...}}` in a configuration
and as --target, what it writes (the map is ms.detections' gradient), and bad input in one line.
The detector is tests/tiny_models.py's TinyYolo at 32x32."""
import json
import re

import numpy as np
import pytest
from skimage import data

import multisal as ms
import tiny_models
from helpers import assert_agree
from multisal.app.cli import main
from multisal.app.config import ConfigError, dump_toml, load_config, tomllib

DETECTOR = ["--model", "tiny_models:tiny_yolo", "--preset", "raw", "--size", "32", "32"]
TARGET = "{detection = {class = 1, box = [4, 4, 20, 20], iou = 0.1}}"


def test_explain_a_detection_from_the_command_line(tmp_path):
    out = tmp_path / "out"
    assert main(["explain", "skimage:astronaut", *DETECTOR, "--method", "vanilla_gradient,gradcam", "--out", str(out),
                 "--target", TARGET]) == 0
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    target = ms.detections(1, box=(4, 4, 20, 20), iou=0.1)
    be = ms.load_backend("torch", model=tiny_models.tiny_yolo())
    x = ms.get_preset("raw").apply(data.astronaut(), size=(32, 32))
    expected = ms.vanilla_gradient(be, x, target)[0]
    assert_agree(np.load(out / "astronaut" / "vanilla_gradient.npy"), expected, tol=1e-5)
    scores = ms.objectives.objective_from_scores(be.predict(x), "logit", target)
    assert record["target"] == 1 and record["label"] == "class 1" and record["top5"] == []
    assert record["detection"]["anchors"] > 0 and record["detection"]["score"] == pytest.approx(scores[0], rel=1e-5)
    assert 0 < record["probability"] <= 1
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["target"] == {"detection": {"class": 1, "box": [4.0, 4.0, 20.0, 20.0], "iou": 0.1, "format": "yolov8"}}
    again = tmp_path / "again"   # the config.toml a run writes runs again
    assert main(["explain", "--config", str(out / "config.toml"), "--out", str(again), "skimage:astronaut"]) == 0
    assert_agree(np.load(again / "astronaut" / "vanilla_gradient.npy"), expected, tol=1e-5)


@pytest.mark.parametrize("target, message", [
    ({"detection": {"box": [0, 0, 4, 4]}}, "config key 'target.detection.class': missing; expected a class index >= 0"),
    ({"detection": {"class": 0, "box": [5, 0, 4, 4]}}, "config key 'target.detection.box': expected [x1, y1, x2, y2]"),
    ({"detection": {"class": 0, "box": [0, 0, 4, 4], "iou": 1.5}}, "config key 'target.detection.iou': expected a number in (0, 1]"),
    ({"detection": {"class": 0, "box": [0, 0, 4, 4], "size": 3}}, "config key 'target.detection.size': unknown key"),
    ({"detections": {"class": 0}}, "config key 'target': expected \"auto\""),
])
def test_bad_detection_targets_name_their_key(target, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config({"model": "tiny_models:tiny_yolo", "preset": "raw", "target": target})


def test_a_detection_box_outside_the_input_or_on_a_classifier(tmp_path, capsys):
    outside = "{detection = {class = 1, box = [40, 4, 50, 20]}}"
    assert main(["explain", "skimage:astronaut", *DETECTOR, "--method", "vanilla_gradient", "--out", str(tmp_path / "a"),
                 "--target", outside]) == 2
    assert ("config key 'target.detection.box': detection target (class 1, box [40.0, 4.0, 50.0, 20.0], yolov8): "
            "the box lies outside the 32x32 input") in capsys.readouterr().err
    classifier = ["--model", "tiny_models:classifier", "--preset", "raw", "--size", "32", "32"]
    assert main(["explain", "skimage:astronaut", *classifier, "--method", "vanilla_gradient", "--out", str(tmp_path / "b"),
                 "--target", TARGET]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected a YOLO-style output (N, 4 + classes, anchors)" in err, err
    assert main(["explain", "skimage:astronaut", *DETECTOR, "--out", str(tmp_path / "c"), "--target", "{detection = "]) == 2
    assert "--target: expected a TOML inline table" in capsys.readouterr().err


def test_the_target_table_is_written_inline():
    cfg = load_config({"model": "tiny_models:tiny_yolo", "preset": "raw",
                       "target": {"detection": {"class": 2, "box": [1, 2, 3, 4], "format": "yolov5", "axis": 2}}})
    assert tomllib.loads(dump_toml(cfg))["target"] == {
        "detection": {"class": 2, "box": [1.0, 2.0, 3.0, 4.0], "iou": 0.5, "format": "yolov5", "axis": 2}}
