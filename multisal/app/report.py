"""index.html for a run: each input with its top-5 classes, the target explained, every method's
overlay with its colour bar and the time it took (and the layer, for CAM methods), and the exact
configuration. A slider fades the overlays and a box puts each beside its photo; images load
lazily (when they come near the window), so a report of thousands of inputs opens at once, from the file system,
with no server. In a notebook, a run shows notebook_html: the grids embedded, no script.

Everything that comes from outside (file names, class names, error messages, the configuration) is
escaped with html.escape, and links are percent-encoded, so a file called "<script>&.png" shows up
as text. The page carries one small inline script that lists, at its top, any image that did not
load and any script error: a broken report says so instead of showing blank boxes (and the tests
read that list from headless Chromium).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..errors import MultisalError
from ..files import DEFAULT_TAG, write_atomic
from ..pictures import apply_colours, colour_table
from .score_tables import STYLE as SCORES_STYLE, image_table, summary_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; --overlay-opacity: 1; }
h2 { margin: 1.6em 0 0.3em; font-size: 1.15em; word-break: break-all; }
.maps { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; }
figure img { height: 224px; display: block; }
img[data-src]:not([src]) { width: 224px; }
figure.wide img { height: auto; max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; max-width: 260px; }
.stack { position: relative; display: flex; gap: 4px; }
.stack img.over { position: absolute; top: 0; left: 0; opacity: var(--overlay-opacity); }
body.side .stack img.over { position: static; }
.bar { height: 8px; margin-top: 3px; }
.ends { display: flex; justify-content: space-between; font-size: 0.75em; color: #444; }
#controls { position: sticky; top: 0; background: #fff; padding: 0.4em 0; border-bottom: 1px solid #ddd; z-index: 1; }
#controls label { margin-right: 1.5em; }
table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 0.9em; }
td, th { padding: 1px 12px 1px 0; text-align: left; }
.failed h2, .error { color: #a00; }
#page-errors { color: #a00; border: 2px solid #a00; padding: 0.5em; }
#page-errors:empty { display: none; }
pre.config { background: #f4f4f4; padding: 0.8em; overflow-x: auto; }
"""

# Lists images that failed to load and script errors in #page-errors, and keeps on <body> how many
# of the page's images are shown so far. Images load lazily: each <img> carries its file in
# data-src, which becomes its src once it comes within 1500 pixels of the window (an
# IntersectionObserver), so a report of thousands of inputs opens at once and reads only what is
# looked at. Wires the controls: the slider sets the overlays' opacity, the box puts each overlay
# beside its photo instead of over it.
SCRIPT = """
(function () {
  var box = document.getElementById("page-errors"), shown = 0;
  function note(text) { box.textContent += text + "\\n"; }
  function count() { document.body.setAttribute("data-images-shown", shown + "/" + document.images.length); }
  window.addEventListener("error", function (event) {
    if (event.target instanceof HTMLImageElement) note("image did not load: " + event.target.getAttribute("src"));
    else note("script error: " + event.message);
  }, true);
  document.addEventListener("load", function (event) {
    if (event.target instanceof HTMLImageElement) { shown++; count(); }
  }, true);
  function load(img) { img.src = img.getAttribute("data-src"); }
  document.addEventListener("DOMContentLoaded", function () {
    var lazy = document.querySelectorAll("img[data-src]");
    var near = "IntersectionObserver" in window && new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { near.unobserve(e.target); load(e.target); } });
    }, {rootMargin: "1500px 0px"});
    for (var i = 0; i < lazy.length; i++) near ? near.observe(lazy[i]) : load(lazy[i]);
    var opacity = document.getElementById("opacity"), side = document.getElementById("side-by-side");
    if (opacity) opacity.addEventListener("input", function () {
      document.body.style.setProperty("--overlay-opacity", String(opacity.value / 100));
    });
    if (side) side.addEventListener("change", function () { document.body.classList.toggle("side", side.checked); });
    count();
  });
})();
"""

CONTROLS = ('<div id="controls"><label>overlay opacity <input type="range" id="opacity" min="0" max="100" '
            'value="100"></label><label><input type="checkbox" id="side-by-side"> photo beside each overlay'
            '</label></div>')


def page(title, body, controls=False) -> str:
    """A complete HTML page around `body` (already escaped HTML), with the load check and, with
    `controls`, the opacity slider and side-by-side box for the overlays of figure(..., under=)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}{SCORES_STYLE}</style>\n</head>\n<body>\n"
            f'<pre id="page-errors"></pre>\n<script>{SCRIPT}</script>\n'
            f"<h1>{html.escape(title)}</h1>\n{CONTROLS if controls else ''}\n{body}\n</body>\n</html>\n")


def link(*parts) -> str:
    """A relative URL for an attribute: each part percent-encoded, then HTML-escaped."""
    return html.escape("/".join(quote(str(p)) for p in parts), quote=True)


def image(src, alt, cls=None) -> str:
    """<img> of a file (src from link()), loaded by the page's script when it comes near the window."""
    return (f'<img data-src="{src}"{f" class={cls}" if cls else ""} alt="{html.escape(alt, quote=True)}" '
            'decoding="async">')


def figure(src, caption_html, alt, wide=False, under=None, bar="") -> str:
    """<figure> of an image (src from link()) with an HTML caption; wide ones shrink to the page.
    With `under` (the photo's src), the image is an overlay stacked on its photo, which the
    page's controls fade and move beside it; `bar` is HTML put under the image (a colour bar)."""
    picture = image(src, alt)
    if under is not None:
        picture = f'<div class="stack">{image(under, "input", "photo")}{image(src, alt, "over")}</div>'
    return (f'<figure{" class=wide" if wide else ""}>{picture}{bar}'
            f"<figcaption>{caption_html}</figcaption></figure>")


def colour_bar(view) -> str:
    """The colour bar of a map's view as it was recorded (kind, cmap, low, high): a CSS gradient
    of its colour map and the values at its two ends; nothing for a colour map not known here."""
    if not isinstance(view, dict):
        return ""
    try:
        table = colour_table(view["cmap"])
    except MultisalError:   # "custom", or a matplotlib colour map where matplotlib is missing
        return ""
    stops = ", ".join(f"rgb({r:.0f},{g:.0f},{b:.0f}) {100 * t:.0f}%"
                      for t, (r, g, b) in zip(np.linspace(0, 1, 11), apply_colours(np.linspace(0, 1, 11), table)))
    return (f'<div class="bar" style="background: linear-gradient(to right, {stops})"></div>'
            f'<div class="ends"><span>{float(view["low"]):.3g}</span><span>{float(view["high"]):.3g}</span></div>')


def write_report(out, records, config_text, title="multisal explain", tag=DEFAULT_TAG, sections=()) -> Path:
    """Write out/index.html for the records of a run (as in manifest.jsonl) and return its path."""
    out = Path(out)
    path = out / "index.html"
    write_atomic(path, render(records, config_text, title, sections).encode("utf-8"), tag)
    return path


def render(records, config_text, title="multisal explain", sections=()) -> str:
    """The report's page: a summary line, one section per input, then `sections` ((heading,
    HTML) pairs, such as a table of scores) and the configuration."""
    ok = sum(r["status"] == "ok" for r in records)
    parts = [f"<p>{len(records)} input{'s' if len(records) != 1 else ''}: {ok} explained, "
             f"{len(records) - ok} failed.</p>"]
    parts += [_section(r) + image_table(r) for r in records]
    parts.append(summary_table(records))
    parts += [f"<h2>{esc(heading)}</h2>\n{body}" for heading, body in sections]
    parts.append(f'<h2>Configuration</h2>\n<pre class="config">{html.escape(config_text)}</pre>')
    return page(title, "\n".join(parts), controls=True)


def esc(value) -> str:
    """Any field as HTML text, numbers too: a record read back from disk may have been edited."""
    return html.escape(str(value))


def _top5(r) -> str:
    rows = "".join(f'<tr><td>{esc(t["class"])}</td><td>{esc(t["label"])}</td>'
                   f'<td>{100 * float(t["probability"]):.1f}%</td></tr>' for t in r["top5"])
    return f'<table><tr><th>class</th><th>name</th><th>probability</th></tr>{rows}</table>'


def _target(r) -> str:
    return (f'target explained: <b>{esc(r["target"])} {esc(r["label"])}</b> ({100 * float(r["probability"]):.1f}%), '
            f'backend {esc(r["backend"])}')


def _caption(method, m) -> str:
    caption = f"{esc(method)}<br>{float(m['seconds']):.2f} s"
    if "samples" in m:
        caption += f", {esc(m['samples'])} samples"
    if "layer" in m:
        caption += f"<br>layer {esc(m['layer'])}"
    return caption


def _section(r) -> str:
    name = esc(r["input"])
    if r["status"] != "ok":
        return (f'<section class="failed"><h2>{name}</h2>'
                f'<p class="error">failed: {esc(r["error"])}</p></section>')
    photo = link(r["folder"], r["photo"])
    figures = [figure(photo, "input", "input")]
    for method, m in r["methods"].items():
        figures.append(figure(link(r["folder"], m["files"][1]), _caption(method, m), str(method), under=photo,
                              bar=colour_bar(m.get("view"))))
    body = (f'<section class="ok"><h2>{name}</h2>'
            f'<p>{_target(r)}, folder <a href="{link(r["folder"])}/">{esc(r["folder"])}</a></p>'
            f'{_top5(r)}<div class="maps">{"".join(figures)}</div>')
    if "progression" in r:
        p = r["progression"]
        body += (f'<p>SmoothGrad after {esc(", ".join(map(str, p["samples"])))} samples '
                 f'(one pass, {float(p["seconds"]):.2f} s):</p>'
                 f'<figure class=wide>{image(link(r["folder"], p["files"][1]), "SmoothGrad progression")}</figure>')
    return body + "</section>"


def notebook_html(output, records, limit=12) -> str:
    """A run as a notebook shows it: per input its grid (embedded, as a notebook cannot reach the
    run's files by a relative link), target, top-5 and each method's time; `limit` inputs at
    most, the rest left to the report, whose path ends it. Plain HTML: no script."""
    output = Path(output)
    ok = sum(r["status"] == "ok" for r in records)
    parts = [f"<p><b>multisal run</b>: {len(records)} input{'s' if len(records) != 1 else ''}, {ok} explained, "
             f"{len(records) - ok} failed.</p>"]
    for r in records[:limit]:
        if r["status"] != "ok":
            parts.append(f'<p><b>{esc(r["input"])}</b>: <span style="color:#a00">failed: {esc(r["error"])}</span></p>')
            continue
        try:
            data = (output / r["folder"] / r["grid"]).read_bytes()
        except OSError as err:
            parts.append(f'<p><b>{esc(r["input"])}</b>: grid not readable ({esc(err.strerror)})</p>')
            continue
        times = "".join(f"<tr><td>{esc(m)}</td><td>{float(v['seconds']):.2f} s</td></tr>"
                        for m, v in r["methods"].items())
        parts.append(f'<h3>{esc(r["input"])}</h3><p>{_target(r)}</p>'
                     f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" '
                     f'alt="{html.escape(r["input"], quote=True)}" style="max-width:100%">'
                     f'<div style="display:flex;gap:2em">{_top5(r)}<table><tr><th>method</th><th>time</th></tr>'
                     f"{times}</table></div>")
    if len(records) > limit:
        parts.append(f"<p>{len(records) - limit} more inputs in the report.</p>")
    parts.append(f"<p>report: {esc(output / 'index.html')}</p>")
    return "\n".join(parts)
