"""Runs over many images: `multisal explain` (start over) and `multisal batch` (resume).

    run = ms.run_batch("job.toml")          # or a dict with a config file's keys

A run writes into its output folder (README, "Command line"): config.toml, manifest.jsonl,
index.html and one folder per input. What makes a batch job safe to run unattended:

- Every file is written atomically (a temporary file in the same folder, then a rename), so an
  output is either complete or absent; temporary files a killed run left behind are removed.
- The manifest is appended one record at a time, each a single write() of a whole line, fsynced,
  once the image's files are all written and synced (os.sync once per batch, as fsyncing every
  file costs more than a small model's gradients). A record therefore means "done", even after a
  power cut. A crash can at worst tear the last line; reading skips such a line, and each run rewrites the manifest
  atomically, one record per input, when it starts and when it ends.
- A rerun resumes: inputs recorded "ok" whose files are all there are skipped; every other input
  (never reached, cut off half-way, or failed) is explained again from an empty folder.
- Resuming with a different configuration would mix two runs' maps in one folder, so it is refused
  (naming the key); only `inputs` (a job may grow) and the [engine] table may change.

Engines ([engine] name): "local" explains `batch_size` images at a time in this process, each
method running once over the stacked images; "ray" (multisal.app.ray_engine) spreads the same batches
over an actor pool, on this machine or a cluster. Both give every image the same outputs, as an
image's noise does not depend on the images beside it (multisal.noise).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..files import write_atomic
from ..progress import progress_bar
from .config import DEFAULT_BATCH, ConfigError, dump_toml, load_config, read_toml, validate
from .inputs import expand_inputs, folder_names
from .job import Job
from .malloc import tune_malloc
from .ray_engine import run_on_ray
from .report import write_report

# Keys a resumed run may change: the inputs (a job may grow) and how the work is spread.
RESUMABLE_CHANGES = ("inputs", "engine")
MANIFEST = "manifest.jsonl"


@dataclass
class ExplainRun:
    output: Path
    records: list                 # one per input, in input order
    skipped: int = 0              # inputs a resumed run found done
    engine: str = "local"
    seconds: float = 0.0          # wall time of the explaining itself

    @property
    def failed(self):
        return [r for r in self.records if r["status"] != "ok"]

    @property
    def report(self) -> Path:
        return self.output / "index.html"


class Manifest:
    """manifest.jsonl: one JSON record per input, keyed by the record's "input"."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = {}
        self._fd = None

    def load(self) -> dict:
        """Read what a previous run recorded (the latest record per input); a torn or unreadable
        line, which only a crash in the middle of a write leaves, is skipped."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return self.records
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("input"), str):
                self.records[record["input"]] = record
        return self.records

    def rewrite(self, order=None):
        """Replace the file atomically by one line per record (in `order` of inputs, where given)."""
        self.close()
        keys = [k for k in (order or []) if k in self.records]
        listed = set(keys)
        keys += [k for k in self.records if k not in listed]
        text = "".join(json.dumps(self.records[k], ensure_ascii=False) + "\n" for k in keys)
        write_atomic(self.path, text.encode("utf-8"))

    def append(self, record):
        """Add one record durably: one write() of the whole line, then fsync."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self._fd)
        self.records[record["input"]] = record

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def run_batch(config=None, overrides=None, progress=None) -> ExplainRun:
    """Explain every input of a configuration (a dict, a TOML path or None for the defaults), with
    `overrides` on top, resuming what an earlier run into the same output folder left undone.
    Raises ConfigError for a configuration that cannot run (before explaining anything); failed
    inputs are in the result's `failed` and the manifest."""
    return _run(config, overrides, progress, resume=True)


def run_explain(config=None, overrides=None, progress=None) -> ExplainRun:
    """As run_batch, but always from the start: the output folder's manifest is replaced."""
    return _run(config, overrides, progress, resume=False)


def _run(config, overrides, progress, resume) -> ExplainRun:
    tune_malloc()   # a job owns its process (multisal/malloc.py)
    cfg = load_config(config, overrides)
    sources = list(dict.fromkeys(expand_inputs(cfg["inputs"])))   # an input listed twice is explained once
    if not sources:
        raise ConfigError("config key 'inputs': no images given; expected image files, globs, folders, "
                          ".txt lists or skimage:NAME (on the command line: multisal explain IMAGE...)")
    progress = sys.stderr.isatty() if progress is None else progress
    out = Path(os.path.expanduser(cfg["output"]))
    engine = cfg.get("engine", {})
    if resume:
        _check_same_job(out, cfg)
    manifest = Manifest(out / MANIFEST)
    previous = manifest.load() if resume else {}
    folders = _folders(sources, previous)
    pending = [s for s in sources if not _done(out, previous.get(s))]
    job = Job(cfg, progress=progress) if pending else None   # set-up errors come before any writing
    out.mkdir(parents=True, exist_ok=True)
    _remove_temporary_files(out)
    config_text = dump_toml(cfg, header="The resolved configuration of this run; "
                                        "`multisal batch --config config.toml` resumes it.")
    write_atomic(out / "config.toml", config_text.encode("utf-8"))
    redo = set(pending)
    manifest.records = {k: v for k, v in previous.items() if k not in redo}
    manifest.rewrite(sources)
    for source in pending:                     # a half-written folder from a killed run starts over
        shutil.rmtree(out / folders[source], ignore_errors=True)
    start = time.perf_counter()
    items = [(s, out / folders[s]) for s in pending]
    try:
        if engine.get("name", "local") == "ray":
            run_on_ray(cfg, items, manifest.append, progress=progress)
        else:
            _run_local(job, items, engine.get("batch_size", DEFAULT_BATCH), manifest.append, progress)
        seconds = time.perf_counter() - start
        manifest.rewrite(sources)
    finally:
        manifest.close()
    records = [manifest.records[s] for s in sources if s in manifest.records]
    write_report(out, records, config_text, title=f"multisal {'batch' if resume else 'explain'}")
    return ExplainRun(out, records, skipped=len(sources) - len(pending), engine=engine.get("name", "local"),
                      seconds=seconds)


def _run_local(job, items, batch_size, on_record, progress):
    with progress_bar(total=len(items), desc="explain", unit="image", enabled=progress) as bar:
        for start in range(0, len(items), batch_size):
            records = job.explain_batch(items[start:start + batch_size])
            os.sync()   # the images' files reach the disk before the records that vouch for them
            for record in records:
                on_record(record)
                bar.update(1)


def _check_same_job(out: Path, cfg):
    """Refuse to resume into a folder whose run had another configuration (RESUMABLE_CHANGES aside)."""
    path = out / "config.toml"
    if not path.exists():
        return
    try:
        before = validate(read_toml(path))
    except ConfigError as err:
        raise ConfigError(f"cannot resume into {str(out)!r}: its config.toml is unusable ({err}); "
                          "use a new output folder") from None
    keys = sorted((set(before) | set(cfg)) - set(RESUMABLE_CHANGES))
    changed = [k for k in keys if before.get(k) != cfg.get(k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"config key {k!r}: {_show(cfg.get(k))} differs from {_show(before.get(k))} in the run "
                          f"already in {str(out)!r}; resuming would mix two runs' outputs, so use a new output "
                          f"folder (or `multisal explain` to start over there)")


def _show(value):
    return "(not set)" if value is None else json.dumps(value)


def _folders(sources, previous) -> dict:
    """Each input's folder: the one a previous run gave it (if it is a name folder_names could have
    made: the manifest must not steer deletions outside the run), else a new unique name."""
    kept = {s: previous[s]["folder"] for s in sources
            if s in previous and re.fullmatch(SAFE_FOLDER, str(previous[s].get("folder")))}
    fresh = [s for s in sources if s not in kept]
    names = dict(zip(fresh, folder_names(fresh, {f.lower() for f in kept.values()})))
    return {s: kept.get(s) or names[s] for s in sources}


SAFE_FOLDER = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,71}"


def _done(out: Path, record) -> bool:
    """An input whose record says "ok" and whose files are all in its folder."""
    if not record or record.get("status") != "ok" or not re.fullmatch(SAFE_FOLDER, str(record.get("folder"))):
        return False
    folder = out / record["folder"]
    files = [record.get("photo"), record.get("grid")]
    files += [f for m in record.get("methods", {}).values() for f in m.get("files", [])]
    files += record.get("progression", {}).get("files", [])
    return all(f and (folder / f).is_file() for f in files)


def _remove_temporary_files(out: Path):
    """Delete what write_atomic leaves when the process is killed between writing and renaming."""
    for path in out.rglob(".*.tmp"):
        if path.is_file():
            path.unlink()
