"""index.html for a run: each input with its top-5 classes, the target explained, every method's
overlay with the time it took (and the layer, for CAM methods), and the exact configuration.

Everything that comes from outside (file names, class names, error messages, the configuration) is
escaped with html.escape, and links are percent-encoded, so a file called "<script>&.png" shows up
as text. The page carries one small inline script that lists, at its top, any image that did not
load and any script error: a broken report says so instead of showing blank boxes (and the tests
read that list from headless Chromium).
"""
from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from ..files import DEFAULT_TAG, write_atomic
from .score_tables import STYLE as SCORES_STYLE, image_table, summary_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { margin: 1.6em 0 0.3em; font-size: 1.15em; word-break: break-all; }
.maps { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; }
figure img { height: 224px; display: block; }
figure.wide img { height: auto; max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; max-width: 260px; }
table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 0.9em; }
td, th { padding: 1px 12px 1px 0; text-align: left; }
.failed h2, .error { color: #a00; }
#page-errors { color: #a00; border: 2px solid #a00; padding: 0.5em; }
#page-errors:empty { display: none; }
pre.config { background: #f4f4f4; padding: 0.8em; overflow-x: auto; }
"""

# Lists images that failed to load and script errors in #page-errors, and records on <body> how
# many images are shown, once the page (images included) has loaded.
CHECK = """
(function () {
  var box = document.getElementById("page-errors");
  function note(text) { box.textContent += text + "\\n"; }
  window.addEventListener("error", function (event) {
    if (!(event.target instanceof HTMLImageElement)) note("script error: " + event.message);
  }, true);
  window.addEventListener("load", function () {
    var images = document.images, shown = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) shown++;
      else note("image did not load: " + images[i].getAttribute("src"));
    }
    document.body.setAttribute("data-images-shown", shown + "/" + images.length);
  });
})();
"""


def page(title, body) -> str:
    """A complete HTML page around `body` (already escaped HTML), with the load check."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}{SCORES_STYLE}</style>\n</head>\n<body>\n"
            f'<pre id="page-errors"></pre>\n<script>{CHECK}</script>\n'
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def link(*parts) -> str:
    """A relative URL for an attribute: each part percent-encoded, then HTML-escaped."""
    return html.escape("/".join(quote(str(p)) for p in parts), quote=True)


def figure(src, caption_html, alt, wide=False) -> str:
    """<figure> of an image (src from link()) with an HTML caption; wide ones shrink to the page."""
    return (f'<figure{" class=wide" if wide else ""}><img src="{src}" alt="{html.escape(alt, quote=True)}">'
            f"<figcaption>{caption_html}</figcaption></figure>")


def write_report(out, records, config_text, title="multisal explain", tag=DEFAULT_TAG) -> Path:
    """Write out/index.html for the records of a run (as in manifest.jsonl) and return its path."""
    out = Path(out)
    path = out / "index.html"
    write_atomic(path, render(records, config_text, title).encode("utf-8"), tag)
    return path


def render(records, config_text, title="multisal explain") -> str:
    ok = sum(r["status"] == "ok" for r in records)
    parts = [f"<p>{len(records)} input{'s' if len(records) != 1 else ''}: {ok} explained, "
             f"{len(records) - ok} failed.</p>"]
    parts += [_section(r) + image_table(r) for r in records]
    parts.append(summary_table(records))
    parts.append(f'<h2>Configuration</h2>\n<pre class="config">{html.escape(config_text)}</pre>')
    return page(title, "\n".join(parts))


def esc(value) -> str:
    """Any field as HTML text, numbers too: a record read back from disk may have been edited."""
    return html.escape(str(value))


def _section(r) -> str:
    name = esc(r["input"])
    if r["status"] != "ok":
        return (f'<section class="failed"><h2>{name}</h2>'
                f'<p class="error">failed: {esc(r["error"])}</p></section>')
    rows = "".join(f'<tr><td>{esc(t["class"])}</td><td>{esc(t["label"])}</td>'
                   f'<td>{100 * float(t["probability"]):.1f}%</td></tr>' for t in r["top5"])
    figures = [figure(link(r["folder"], r["photo"]), "input", "input")]
    for method, m in r["methods"].items():
        caption = f"{esc(method)}<br>{float(m['seconds']):.2f} s"
        if "samples" in m:
            caption += f", {esc(m['samples'])} samples"
        if "layer" in m:
            caption += f"<br>layer {esc(m['layer'])}"
        figures.append(figure(link(r["folder"], m["files"][1]), caption, str(method)))
    body = (f'<section class="ok"><h2>{name}</h2>'
            f'<p>target explained: <b>{esc(r["target"])} {esc(r["label"])}</b> ({100 * float(r["probability"]):.1f}%), '
            f'backend {esc(r["backend"])}, folder <a href="{link(r["folder"])}/">{esc(r["folder"])}</a></p>'
            f'<table><tr><th>class</th><th>name</th><th>probability</th></tr>{rows}</table>'
            f'<div class="maps">{"".join(figures)}</div>')
    if "progression" in r:
        p = r["progression"]
        body += (f'<p>SmoothGrad after {esc(", ".join(map(str, p["samples"])))} samples '
                 f'(one pass, {float(p["seconds"]):.2f} s):</p>'
                 f'<img src="{link(r["folder"], p["files"][1])}" alt="SmoothGrad progression" style="max-width:100%">')
    return body + "</section>"
