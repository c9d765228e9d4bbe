"""index.html: what it shows (top-5, target, overlays, colour bars, times, layers, the
configuration), escaping of file names and class names, and the real page opened from the file
system in headless Chromium (tests/chromium.py): every image loads once scrolled to, the console
stays clean, the slider fades the overlays (read back from screenshots), the box puts them beside
their photos, and a page of 2000 inputs loads only the images near the window. The page lists
broken images itself (#page-errors, data-images-shown); the test checks that this check does catch
a missing image."""
import base64
import html
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from chromium import Chromium
from multisal.app.cli import main
from multisal.app.report import render
from multisal.app.runs import ExplainRun

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
    images = [a for t, a in tags if t == "img"]
    assert not [a for a in images if "src" in a]                    # each loaded lazily, by the page's script
    sources = [a["data-src"] for a in images]
    assert len(sources) == 2 * (1 + 2 * len(METHODS.split(",")))   # the photo, then each overlay on the photo
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


def _scroll_through(browser):
    """Scroll to each image in turn and wait until it has loaded or failed (they load lazily,
    as they come near the window); then the page's own count of shown images."""
    return browser.evaluate("""(async () => {
      const frame = () => new Promise(done => requestAnimationFrame(() => setTimeout(done, 0)));
      for (const img of Array.from(document.images)) {
        img.scrollIntoView();
        while (!(img.getAttribute("src") && img.complete)) await frame();
      }
      await frame();
      return document.body.getAttribute("data-images-shown");
    })()""")


def _grey(png):
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(np.float64)


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(tmp_path / "profile")
    yield chromium
    chromium.close()


def test_page_loads_in_headless_chromium(run, browser, tmp_path):
    out, page, _ = run
    count = page.count("<img ")
    browser.open(out / "index.html")
    assert _scroll_through(browser) == f"{count}/{count}"
    assert browser.evaluate('document.getElementById("page-errors").textContent') == ""
    assert browser.problems == []
    # The check does fail: with one overlay gone, the page reports it.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "plain" / "smoothgrad.png").unlink()
    browser.open(copy / "index.html")
    assert _scroll_through(browser) == f"{count - 1}/{count}"
    assert browser.evaluate('document.getElementById("page-errors").textContent').strip() == \
        "image did not load: plain/smoothgrad.png"


def test_slider_fades_the_overlays_and_the_box_puts_them_beside_the_photo(run, browser):
    out, _, _ = run
    browser.open(out / "index.html")
    _scroll_through(browser)
    rect = "(e => { const r = e.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })"
    photo, over = (browser.evaluate(f'{rect}(document.querySelectorAll("img.{c}")[0])') for c in ("photo", "over"))
    assert over == photo                                        # stacked: the overlay covers its photo
    clip = dict(zip(("x", "y", "width", "height"), over))

    def slide(value):
        return browser.evaluate(f"""(() => {{ const s = document.getElementById("opacity"); s.value = {value};
          s.dispatchEvent(new Event("input", {{bubbles: true}}));
          return getComputedStyle(document.querySelector("img.over")).opacity; }})()""")

    shots = {}
    for value in (100, 30, 0):
        assert float(slide(value)) == pytest.approx(value / 100)
        shots[value] = _grey(browser.screenshot(clip))
    def drawn(cls):   # the file an image shows, at its size on the page
        src = browser.evaluate(f'document.querySelectorAll("img.{cls}")[0].getAttribute("src")')
        return cv2.resize(cv2.imread(str(out / unquote(src))).astype(np.float64), shots[0].shape[1::-1])

    overlay, photo_pixels = drawn("over"), drawn("photo")
    # At 0 the page shows the photo, at 100 the overlay, at 30 the blend between them.
    assert np.abs(shots[0] - photo_pixels).mean() < np.abs(shots[100] - photo_pixels).mean() / 4
    assert np.abs(shots[100] - overlay).mean() < np.abs(shots[0] - overlay).mean() / 4
    blend = 0.7 * shots[0] + 0.3 * shots[100]
    assert np.abs(shots[30] - blend).mean() < 3
    browser.evaluate('document.getElementById("side-by-side").click()')
    photo, over = (browser.evaluate(f'{rect}(document.querySelectorAll("img.{c}")[0])') for c in ("photo", "over"))
    assert over[0] >= photo[0] + photo[2] and over[1] == photo[1]   # beside it, on the same line
    assert browser.problems == []


def test_images_load_lazily(run, browser):
    """A report of 1000 inputs opens with only the images near the window loaded, and loads the
    others as the page scrolls to them."""
    out, _, _ = run
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    many = [dict(ok[i % len(ok)], input=f"photo {i}") for i in range(1000)]
    big = out / "big.html"
    big.write_text(render(many, ""), encoding="utf-8")
    browser.open(big)
    # The count once images have started to show and none more came in half a second.
    settled = """(async () => {
      const now = () => document.body.getAttribute("data-images-shown");
      const pause = ms => new Promise(done => setTimeout(done, ms));
      while (now().startsWith("0/")) await pause(20);
      for (let last = null; last !== now(); ) { last = now(); await pause(500); }
      return now();
    })()"""
    shown, total = map(int, browser.evaluate(settled).split("/"))
    assert total == 1000 * (1 + 2 * len(METHODS.split(",")))
    assert 0 < shown < 200
    browser.evaluate("window.scrollTo(0, document.body.scrollHeight / 2)")
    later = int(browser.evaluate(settled).split("/")[0])
    assert shown < later < shown + 200
    assert browser.problems == []


def test_a_run_shows_itself_in_a_notebook(run):
    """ExplainRun._repr_html_: each input's grid embedded (a notebook cannot follow the run's
    relative links), its target, top-5 and each method's time, no script; failures named."""
    out, _, inputs = run
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    shown = ExplainRun(out, records)._repr_html_()
    tags = parse(shown).tags
    assert "script" not in [t for t, _ in tags]
    embedded = [a["src"] for t, a in tags if t == "img"]
    assert len(embedded) == 2
    for src, record in zip(embedded, records):
        assert base64.b64decode(src.split(",", 1)[1]) == (out / record["folder"] / "grid.png").read_bytes()
    text = html.unescape(shown)
    assert text.count("%</td>") == 2 * 5
    for record in records[:2]:
        for name, m in record["methods"].items():
            assert f"<td>{name}</td><td>{m['seconds']:.2f} s</td>" in text
    assert f"failed: image '{inputs[2]}' not found" in text and LABELS[0] in text
    assert str(out / "index.html") in text
    limited = ExplainRun(out, records * 10)._repr_html_()
    assert limited.count("<img ") == 12 - 12 // 3 and "18 more inputs in the report." in limited
