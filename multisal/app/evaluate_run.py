"""`multisal evaluate RUN_DIR` and `multisal explain --evaluate`: score the maps of a finished run.

The run's folder holds what this needs (README, "Command line"): config.toml (the backend, the
model and its preset, the methods' options), manifest.jsonl (each input's source, folder and
target) and each input's <method>.npy, the raw map at the model's input size. Each explained
input is read again from its source and preprocessed as the run did; its maps, and the random
and Sobel baselines, are scored by ms.evaluate against the class the run explained. The scores go
into the input's manifest record ("evaluation": {map: {metric: score}}), and index.html is
written again with an evaluation table per image and a summary over the run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MultisalError
from ..evaluation import METRICS, check_metrics, evaluate
from ..files import read_text
from ..progress import progress_bar
from .config import load_config
from .inputs import read_image
from .job import Job
from .output import SAFE_FOLDER, OutputFolder
from .report import write_report
from .runs import FILE_NAME, MANIFEST, Manifest


@dataclass
class EvaluatedRun:
    output: Path
    records: list       # every record of the run, in the manifest's order
    failed: list        # [(input, reason)] of explained inputs that could not be scored

    @property
    def report(self) -> Path:
        return self.output / "index.html"


def evaluate_run(run_dir, metrics=METRICS, progress=False, **options) -> EvaluatedRun:
    """Score the maps of the finished run in `run_dir` with `metrics` (ms.evaluate's names; its
    other keywords in `options`), record them in its manifest and rewrite its index.html."""
    metrics = check_metrics(metrics)
    output = OutputFolder(run_dir)
    shown = repr(str(run_dir))
    if not output.root.is_dir():
        raise MultisalError(f"run folder {shown} is not a folder")
    for name in ("config.toml", MANIFEST):
        if not (output.root / name).is_file():
            raise MultisalError(f"run folder {shown} holds no {name}: expected the output folder of a finished "
                                "`multisal explain` or `multisal batch`")
    config_text = read_text(str(output.root / "config.toml"), "run configuration")
    job = Job(load_config(str(output.root / "config.toml")), progress=progress, temp_tag=output.tag)
    manifest = Manifest(output.root / MANIFEST, output.tag)
    records = manifest.load()
    done = [r for r in records.values() if r["status"] == "ok"]
    if not done:
        raise MultisalError(f"run folder {shown}: its manifest records no explained input to evaluate")
    failed = []
    for record in progress_bar(done, desc="evaluate", enabled=progress, unit="image"):
        try:
            record["evaluation"] = _scores(job, output.root, record, metrics, progress, options)
        except MultisalError as err:
            record.pop("evaluation", None)
            failed.append((record["input"], str(err)))
    manifest.rewrite()
    ordered = list(manifest.records.values())
    write_report(output.root, ordered, config_text, title="multisal explain", tag=output.tag)
    return EvaluatedRun(output.root, ordered, failed)


def _scores(job, root, record, metrics, progress, options) -> dict:
    """{map: {metric: score}} of one record's maps (finite scores only: strict JSON has no NaN)."""
    folder = record["folder"]
    if not re.fullmatch(SAFE_FOLDER, folder):
        raise MultisalError(f"manifest record of {record['input']!r}: folder {folder!r} is not one a run makes")
    x = job.preset.apply(read_image(record["input"]))
    maps = {}
    for name, entry in record["methods"].items():
        if name not in job.methods:
            continue
        npy = entry["files"][0]
        path = root / folder / npy
        if not FILE_NAME.fullmatch(npy) or not path.is_file():
            raise MultisalError(f"map {str(path)!r} of {record['input']!r} is missing")
        try:
            sal = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise MultisalError(f"cannot read map {str(path)!r}: {err}") from None
        maps[name] = sal[None]
    if not maps:
        raise MultisalError(f"{record['input']!r} has no map of the run's methods to evaluate")
    scores = evaluate(job.backend, x, maps, metrics=metrics, target=np.array([record["target"]], np.int64),
                      baselines=True, method_options={k: dict(v) for k, v in job.methods.items()},
                      progress=progress, **options)
    return {name: {m: float(v[0]) for m, v in row.items() if math.isfinite(float(v[0]))}
            for name, row in scores.items()}
