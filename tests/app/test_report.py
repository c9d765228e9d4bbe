"""index.html: what it shows (top-5, target, overlays, times, layers, the configuration), escaping of
file names and class names, and the real page opened in headless Chromium: every image loads and
the console stays clean. The page lists broken images itself (#page-errors, data-images-shown);
the test checks that this check does catch a missing image."""
import html
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from multisal.app.cli import main

EVIL = "a<script>alert(1)&b.png"   # a file name can hold anything but "/"
LABELS = ["<i>zero</i> & co", "one", "two", "three", "four"]
METHODS = "vanilla_gradient,smoothgrad,gradcam_pp"


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of #page-errors."""

    def __init__(self):
        super().__init__()
        self.tags, self.errors, self._in_errors = [], "", False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_errors = dict(attrs).get("id") == "page-errors"

    def handle_endtag(self, tag):
        self._in_errors = False

    def handle_data(self, data):
        if self._in_errors:
            self.errors += data


def parse(text):
    parser = Tags()
    parser.feed(text)
    return parser


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    for i, name in enumerate([EVIL, "plain.png"]):
        rgb = np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / name), rgb)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    out = folder / "out"
    inputs = [str(folder / EVIL), str(folder / "plain.png"), str(folder / "<img src=x onerror=alert(2)>.png")]
    code = main(["explain", *inputs, "--model", "tiny_models:classifier", "--preset", "raw", "--size", "32", "32",
                 "--labels", str(folder / "labels.txt"), "--target", "0", "--method", METHODS, "--out", str(out)])
    assert code == 1                                   # the third input does not exist
    return out, (out / "index.html").read_text(encoding="utf-8"), inputs


def test_names_and_labels_are_escaped(run):
    out, page, inputs = run
    tags = parse(page).tags
    assert [t for t, _ in tags].count("script") == 1                 # the page's own check, nothing injected
    assert not [t for t, _ in tags if t == "i"]
    assert not [a for t, a in tags if "onerror" in a]
    assert html.escape(inputs[0]) in page and "a&lt;script&gt;alert(1)&amp;b.png" in page
    assert "&lt;i&gt;zero&lt;/i&gt; &amp; co" in page
    assert html.escape(inputs[2]) in page                            # the failed input, escaped too
    # Every image link (percent-encoded) points at a file of the run.
    sources = [a["src"] for t, a in tags if t == "img"]
    assert len(sources) == 2 * (1 + len(METHODS.split(",")))
    for src in sources:
        assert (out / unquote(src)).is_file(), src


def test_report_shows_classes_target_times_layers_and_config(run):
    out, page, inputs = run
    text = " ".join(html.unescape(page).split())
    assert "3 inputs: 2 explained, 1 failed." in text
    assert f"target explained: <b>0 {LABELS[0]}</b>" in text
    for label in LABELS:
        assert label in text
    assert text.count("%</td>") == 2 * 5                              # top-5 probabilities of each image
    assert text.count("<br>layer 3") == 2                             # gradcam_pp's layer, per image
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for record in records[:2]:
        for name, m in record["methods"].items():
            assert f"{name}<br>{m['seconds']:.2f} s" in text
    assert f"failed: image '{inputs[2]}' not found" in text
    config = (out / "config.toml").read_text()
    assert html.escape(config) in page                               # the exact configuration


def _chromium(page_path, profile):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("MULTISAL_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", Path(page_path).as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return parse(done.stdout), done.stdout, done.stderr


def test_page_loads_in_headless_chromium(run, tmp_path):
    out, page, _ = run
    count = page.count("<img ")
    dom, text, log = _chromium(out / "index.html", tmp_path / "profile")
    body = dict(next(a for t, a in dom.tags if t == "body"))
    assert dom.errors == ""
    assert body.get("data-images-shown") == f"{count}/{count}", text[:500]
    console = [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    # The check does fail: with one overlay gone, the page reports it.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "plain" / "smoothgrad.png").unlink()
    dom, _, _ = _chromium(copy / "index.html", tmp_path / "profile2")
    body = dict(next(a for t, a in dom.tags if t == "body"))
    assert dom.errors.strip() == "image did not load: plain/smoothgrad.png"
    assert body.get("data-images-shown") == f"{count - 1}/{count}"
