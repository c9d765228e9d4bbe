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
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MultisalError
from ..files import DEFAULT_TAG, write_atomic
from ..pictures import KINDS
from ..progress import progress_bar
from .config import DEFAULT_BATCH, ConfigError, dump_toml, load_config, read_toml, validate
from .inputs import expand_inputs, folder_names
from .job import Job
from .malloc import tune_malloc
from .output import CONFIG_HEADER, SAFE_FOLDER, OutputFolder
from .ray_engine import connect_ray, run_on_ray
from .report import notebook_html, write_report

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

    def _repr_html_(self):
        """In a notebook a run shows itself: each input's grid, its top classes and the times."""
        return notebook_html(self.output, self.records)


class Manifest:
    """manifest.jsonl: one JSON record per input, keyed by the record's "input"."""

    def __init__(self, path: Path, tag: str = DEFAULT_TAG):
        self.path = Path(path)
        self.tag = tag
        self.records = {}
        self._fd = None

    def load(self) -> dict:
        """Read what a previous run recorded (the latest record per input). A torn line, which only
        a crash in the middle of a write leaves, and a record of the wrong shape (a manifest
        edited by hand) are skipped: their inputs are explained again."""
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return self.records
        except OSError as err:
            raise MultisalError(f"cannot read manifest {str(self.path)!r}: {err.strerror}") from None
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if valid_record(record):
                self.records[record["input"]] = record
        return self.records

    def rewrite(self, order=None):
        """Replace the file atomically by one line per record (in `order` of inputs, where given)."""
        self.close()
        keys = [k for k in (order or []) if k in self.records]
        listed = set(keys)
        keys += [k for k in self.records if k not in listed]
        text = "".join(_line(self.records[k]) for k in keys)
        write_atomic(self.path, text.encode("utf-8"), self.tag)

    def append(self, record):
        """Add one record durably: one write() of the whole line, then fsync."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        os.write(self._fd, _line(record).encode("utf-8"))
        os.fsync(self._fd)
        self.records[record["input"]] = record

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _line(record) -> str:
    """A record as one line of strict JSON (no NaN or Infinity, which strict parsers reject)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def valid_record(r) -> bool:
    """Is `r` a record as a run writes it? Read back from disk, it steers what is skipped and what
    the report shows, so every field is checked for its type (and file names for their form)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def files(v):
        return isinstance(v, list) and all(isinstance(f, str) and FILE_NAME.fullmatch(f) for f in v)

    def class_entry(t):
        return isinstance(t, dict) and isinstance(t.get("class"), int) and isinstance(t.get("label"), str) \
            and number(t.get("probability"))

    if not (isinstance(r, dict) and isinstance(r.get("input"), str) and r.get("status") in ("ok", "failed")
            and isinstance(r.get("folder"), str) and isinstance(r.get("methods", {}), dict)):
        return False
    if r["status"] == "failed":
        return isinstance(r.get("error"), (str, type(None)))
    def view(v):   # how the map was drawn (multisal.pictures.View.record), for the report's colour bar
        return v is None or (isinstance(v, dict) and v.get("kind") in KINDS and isinstance(v.get("cmap"), str)
                             and number(v.get("low")) and number(v.get("high")))

    methods_ok = all(isinstance(m, dict) and number(m.get("seconds")) and files(m.get("files"))
                     and len(m["files"]) == 2 and isinstance(m.get("layer", ""), str)
                     and isinstance(m.get("samples", 0), int) and view(m.get("view"))
                     for m in r["methods"].values())
    progression = r.get("progression")
    return (methods_ok and isinstance(r.get("target"), int) and isinstance(r.get("label"), str)
            and number(r.get("probability")) and isinstance(r.get("top5"), list)
            and all(class_entry(t) for t in r["top5"]) and isinstance(r.get("backend"), str)
            and files([r.get("photo"), r.get("grid")])
            and (progression is None or (isinstance(progression, dict) and number(progression.get("seconds"))
                                         and files(progression.get("files"))
                                         and all(isinstance(k, int) for k in progression.get("samples", [])))))


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
    tune_malloc()   # a job owns its process (multisal/app/malloc.py)
    cfg = load_config(config, overrides)
    output = OutputFolder(cfg["output"])
    output.check()
    manifest = Manifest(output.root / MANIFEST)
    recorded = manifest.load() if output.is_run_folder() else {}
    # An input listed twice is explained once; the run's own outputs (files in the folders its
    # manifest recorded) are never its inputs. The user's files beside them are: with `--out .`
    # the output folder is where the photos are.
    own = [output.root / r["folder"] for r in recorded.values() if output.is_own_folder(r["folder"])]
    sources = [s for s in dict.fromkeys(expand_inputs(cfg["inputs"])) if not _inside(s, own)]
    if not sources:
        raise ConfigError("config key 'inputs': no images given; expected image files, globs, folders, "
                          ".txt lists or skimage:NAME (on the command line: multisal explain IMAGE...)")
    progress = sys.stderr.isatty() if progress is None else progress
    engine = cfg.get("engine", {})
    if resume:
        _check_same_job(output, cfg)
    previous = recorded if resume else {}
    folders = _folders(sources, recorded, output)
    pending = [s for s in sources if not _done(output.root, previous.get(s))]
    job = Job(cfg, progress=progress, temp_tag=output.tag) if pending else None   # set-up errors come before any writing
    if engine.get("name", "local") == "ray" and pending:
        ray_cluster = connect_ray(cfg)   # a cluster that cannot be reached is refused before any writing
    output.create()
    manifest.path, manifest.tag = output.root / MANIFEST, output.tag
    output.remove_temporary_files(output.root / f for f in folders.values() if (output.root / f).is_dir())
    config_text = dump_toml(cfg, header=CONFIG_HEADER[2:] + "; `multisal batch --config config.toml` resumes it.")
    write_atomic(output.root / "config.toml", config_text.encode("utf-8"), output.tag)
    # Each pending input is recorded with its folder before it is explained, as not done yet: a
    # crash then leaves records that tell the rerun which folders are this job's to reuse.
    manifest.records = {k: v for k, v in previous.items() if k not in set(pending)}
    for source in pending:
        manifest.records[source] = _failed(source, folders[source], cfg, "not explained: the run stopped first")
    manifest.rewrite(sources)
    items, refused = [], []
    for source in pending:
        try:
            items.append((source, output.input_folder(folders[source], recorded=source in recorded)))
        except MultisalError as err:   # a link or file planted where the folder goes: this input fails
            refused.append(_failed(source, folders[source], cfg, str(err)))
    start = time.perf_counter()
    try:
        for record in refused:
            manifest.append(record)
        if engine.get("name", "local") == "ray":
            run_on_ray(cfg, items, manifest.append, progress=progress, cluster=ray_cluster, temp_tag=output.tag)
        else:
            _run_local(job, items, engine.get("batch_size", DEFAULT_BATCH), manifest.append, progress)
        seconds = time.perf_counter() - start
        manifest.rewrite(sources)
    finally:
        manifest.close()
    for source, folder in items:   # a folder this run made for an input that failed holds nothing
        if manifest.records.get(source, {}).get("status") != "ok" and source not in recorded:
            try:
                folder.rmdir()
            except OSError:        # not empty: the input failed after writing some of its files
                pass
    records = [manifest.records[s] for s in sources if s in manifest.records]
    write_report(output.root, records, config_text, title=f"multisal {'batch' if resume else 'explain'}",
                 tag=output.tag)
    return ExplainRun(output.root, records, skipped=len(sources) - len(pending), engine=engine.get("name", "local"),
                      seconds=seconds)


def _failed(source, folder, cfg, error) -> dict:
    return {"input": source, "status": "failed", "error": error, "folder": folder, "target": None, "label": None,
            "backend": cfg["backend"], "methods": {}}


def _inside(source, folders) -> bool:
    """Is an input file inside one of these folders (a run's own: a glob that covers them would
    feed a run its own maps)?"""
    if source.startswith("skimage:") or not folders:
        return False
    try:
        parents = Path(source).resolve().parents
        return any(folder.resolve() in parents for folder in folders)
    except (OSError, RuntimeError):
        return False


def _run_local(job, items, batch_size, on_record, progress):
    with progress_bar(total=len(items), desc="explain", unit="image", enabled=progress) as bar:
        for start in range(0, len(items), batch_size):
            records = job.explain_batch(items[start:start + batch_size])
            os.sync()   # the images' files reach the disk before the records that vouch for them
            for record in records:
                on_record(record)
                bar.update(1)


def _check_same_job(output: OutputFolder, cfg):
    """Refuse to resume into a folder whose run had another configuration (RESUMABLE_CHANGES aside)."""
    out = output.given
    path = output.root / "config.toml"
    if not path.exists():
        return
    try:
        before = validate(read_toml(path))
    except ConfigError as err:
        raise ConfigError(f"cannot resume into {out!r}: its config.toml is unusable ({err}); "
                          "use a new output folder") from None
    keys = sorted((set(before) | set(cfg)) - set(RESUMABLE_CHANGES))
    changed = [k for k in keys if before.get(k) != cfg.get(k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"config key {k!r}: {_show(cfg.get(k))} differs from {_show(before.get(k))} in the run "
                          f"already in {out!r}; resuming would mix two runs' outputs, so use a new output "
                          f"folder (or `multisal explain` to start over there)")


def _show(value):
    return "(not set)" if value is None else json.dumps(value)


def _folders(sources, recorded, output: OutputFolder) -> dict:
    """Each input's folder: the one this job's manifest recorded for it (where it is still a real
    folder of the output folder), else a new name that nothing in the output folder uses."""
    kept = {s: recorded[s]["folder"] for s in sources if s in recorded and output.is_own_folder(recorded[s]["folder"])}
    fresh = [s for s in sources if s not in kept]
    taken = output.taken_names() | {f.lower() for f in kept.values()}
    names = dict(zip(fresh, folder_names(fresh, taken)))
    return {s: kept.get(s) or names[s] for s in sources}


def _done(out: Path, record) -> bool:
    """An input whose record says "ok" and whose files are all in its folder, as regular files."""
    if not record or record.get("status") != "ok" or not re.fullmatch(SAFE_FOLDER, str(record.get("folder"))):
        return False
    folder = out / record["folder"]
    if folder.is_symlink():
        return False
    files = [record.get("photo"), record.get("grid")]
    files += [f for m in record.get("methods", {}).values() for f in m.get("files", [])]
    files += record.get("progression", {}).get("files", [])
    return all(f and (folder / f).is_file() and not (folder / f).is_symlink() for f in files)
