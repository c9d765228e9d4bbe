"""The evaluation tables of index.html: per image, its maps (methods, then the random and Sobel
baselines) by metric; over the run, each map's mean and spread by metric. The best value of each
column (by the metric's direction, multisal.evaluation.HIGHER_IS_BETTER) is marked.

A record's "evaluation" is read back from manifest.jsonl, which may have been edited: only
finite numbers under known metric names are shown, everything else is left out, and every name is
escaped."""
from __future__ import annotations

import html
import math

import numpy as np

from ..evaluation import HIGHER_IS_BETTER

STYLE = """
table.scores td.best { font-weight: bold; }
table.scores td.best::after { content: " \\2605"; color: #b8860b; }
table.scores td, table.scores th { text-align: right; }
table.scores td:first-child, table.scores th:first-child { text-align: left; }
"""


def record_scores(record) -> dict:
    """{map: {metric: float}} of a record's evaluation, keeping finite numbers of known metrics only."""
    scores = record.get("evaluation") if isinstance(record, dict) else None
    if not isinstance(scores, dict):
        return {}
    out = {}
    for name, by_metric in scores.items():
        if isinstance(name, str) and isinstance(by_metric, dict):
            kept = {m: float(v) for m, v in by_metric.items() if m in HIGHER_IS_BETTER and _number(v)}
            if kept:
                out[name] = kept
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _table(rows, metrics, caption) -> str:
    """rows: {map: {metric: (value to rank by, text)}}; the best per column carries class "best"."""
    best = {}
    for metric in metrics:
        values = [row[metric][0] for row in rows.values() if metric in row]
        if values:
            best[metric] = max(values) if HIGHER_IS_BETTER[metric] else min(values)
    head = "".join(f"<th>{html.escape(m)} {'&uarr;' if HIGHER_IS_BETTER[m] else '&darr;'}</th>" for m in metrics)
    lines = []
    for name, row in rows.items():
        cells = []
        for metric in metrics:
            if metric not in row:
                cells.append("<td></td>")
                continue
            value, text = row[metric]
            mark = ' class="best"' if value == best.get(metric) else ""
            cells.append(f"<td{mark}>{html.escape(text)}</td>")
        lines.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return (f'<table class="scores"><caption>{html.escape(caption)}</caption><tr><th>map</th>{head}</tr>'
            f"{''.join(lines)}</table>")


def _metrics(all_scores) -> list:
    present = {m for scores in all_scores for row in scores.values() for m in row}
    return [m for m in HIGHER_IS_BETTER if m in present]


def image_table(record) -> str:
    """The evaluation table of one record's maps, or "" when it has none."""
    scores = record_scores(record)
    if not scores:
        return ""
    rows = {name: {m: (v, f"{v:.4f}") for m, v in row.items()} for name, row in scores.items()}
    return _table(rows, _metrics([scores]), "evaluation (best per column marked; arrows: which way is better)")


def summary_table(records) -> str:
    """The run's summary: each map's mean and standard deviation over the evaluated images, or ""."""
    per_image = [record_scores(r) for r in records if r.get("status") == "ok"]
    per_image = [s for s in per_image if s]
    if not per_image:
        return ""
    names = list(dict.fromkeys(name for s in per_image for name in s))
    rows = {}
    for name in names:
        row = {}
        for metric in _metrics(per_image):
            values = [s[name][metric] for s in per_image if metric in s.get(name, {})]
            if values:
                mean, spread = float(np.mean(values)), float(np.std(values))
                row[metric] = (mean, f"{mean:.4f} ± {spread:.4f}")
        rows[name] = row
    count = len(per_image)
    return (f"<h2>Evaluation over the run</h2>\n<p>Mean ± standard deviation over {count} image"
            f"{'s' if count != 1 else ''}; the best mean per column is marked. Deletion and insertion: the area "
            "under the target's probability as pixels are removed or inserted in the map's order; ROAD: the "
            "probability after removing the most (MoRF) or least (LeRF) relevant pixels; randomization and "
            "random_logit: rank correlation with the map of a randomised model or another class; sparseness "
            "(Gini) and complexity (entropy) of the map. The random and sobel rows are trivial maps.</p>\n"
            + _table(rows, _metrics(per_image), "summary"))
