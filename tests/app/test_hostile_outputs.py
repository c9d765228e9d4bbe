"""Hostile and broken output folders: multisal deletes only what it wrote, writes nothing outside
the output folder (nor through a link planted in it), escapes what it reads back, and says every
problem in one line (multisal.app.output, multisal.app.runs, multisal.files).

Every run is the tiny classifier at 32x32 with one or two cheap methods; each test snapshots the
tree around the output folder (hostile.Untouched) or the user's own files in it (hostile.Kept).
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile import TINY, Kept, Untouched, expect_error, expect_one_failure, photo, run_cli
from multisal.app import runs
from multisal.app.output import OutputFolder

TESTS = Path(__file__).resolve().parents[1]
FAST = [*TINY, "--method", "vanilla_gradient"]


def _records(out):
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]


def _explained(out):
    return {r["input"]: r for r in _records(out) if r["status"] == "ok"}


# ---- folders of the user's that share an input's name ----------------------------------------------
def test_explain_a_folder_into_dot_keeps_the_folder_of_the_same_name(tmp_path, monkeypatch, capsys):
    # `multisal explain cats --out .` with photos in ./cats, one of them cats.png: the input's
    # folder would be ./cats, which is the user's.
    photo(tmp_path / "cats" / "cats.png", 0)
    photo(tmp_path / "cats" / "tabby.png", 1)
    monkeypatch.chdir(tmp_path)
    kept = Kept(tmp_path)
    code, _, err = run_cli(["explain", "cats", "--out", ".", *FAST], capsys)
    assert (code, err) == (0, [])
    kept.check()
    by_input = _explained(tmp_path)
    assert by_input[os.path.join("cats", "cats.png")]["folder"] == "cats-2"
    assert (tmp_path / "cats-2" / "vanilla_gradient.npy").is_file()


def test_out_dot_keeps_a_source_folder_named_like_an_input(tmp_path, monkeypatch, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('mine')\n")
    photo(tmp_path / "src.png", 2)
    monkeypatch.chdir(tmp_path)
    kept = Kept(tmp_path)
    code, _, err = run_cli(["explain", "src.png", "--out", ".", *FAST], capsys)
    assert (code, err) == (0, [])
    kept.check()
    assert _explained(tmp_path)["src.png"]["folder"] == "src-2"
    # and a rerun (explain starts over) still leaves ./src alone, reusing its own src-2
    assert run_cli(["explain", "src.png", "--out", ".", *FAST], capsys)[0] == 0
    kept.check()
    assert _explained(tmp_path)["src.png"]["folder"] == "src-2" and not (tmp_path / "src-3").exists()


def test_batch_keeps_a_notes_folder_the_user_put_in_the_output_folder(tmp_path, capsys):
    a, notes = tmp_path / "a.png", tmp_path / "notes.png"
    photo(a, 3)
    photo(notes, 4)
    out = tmp_path / "out"
    assert run_cli(["batch", a, "--out", out, *FAST], capsys)[0] == 0
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("buy milk\n")
    untouched = Untouched(tmp_path, out)
    kept = Kept(out / "notes")
    code, stdout, err = run_cli(["batch", a, notes, "--out", out, *FAST], capsys)
    assert (code, err) == (0, []) and "(1 done before)" in stdout
    kept.check()
    untouched.check()
    assert _explained(out)[str(notes)]["folder"] == "notes-2"


def test_only_the_runs_own_temporary_files_are_removed(tmp_path, capsys):
    a = tmp_path / "a.png"
    photo(a, 5)
    out = tmp_path / "out"
    assert run_cli(["explain", a, "--out", out, *FAST], capsys)[0] == 0
    tag = OutputFolder(out).tag
    mine = [out / ".notes.tmp", out / "a" / ".draft.tmp", out / ".x.multisal-0123456789-abcdef.tmp"]
    for path in mine:   # the user's, and another run's tag
        path.write_text("keep me")
    leftover = out / "a" / f".grid.png.{tag}-000000000000.tmp"   # this run's killed write
    leftover.write_bytes(b"half")
    untouched = Untouched(tmp_path, out)
    assert run_cli(["batch", a, "--out", out, *FAST], capsys)[0] == 0
    untouched.check()
    assert all(p.read_text() == "keep me" for p in mine)
    assert not leftover.exists()


# ---- links planted in the output folder ------------------------------------------------------------
def test_a_link_planted_as_an_inputs_folder_is_not_written_through(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    photo(a, 6)
    photo(b, 7)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run_cli(["batch", a, "--out", out, *FAST], capsys)[0] == 0
    # out/a (recorded "ok") replaced by a link, and a link where b's folder would go
    os.rename(out / "a", tmp_path / "a-moved")
    os.symlink(elsewhere, out / "a")
    os.symlink(elsewhere, out / "b")
    untouched = Untouched(tmp_path, out)
    code, _, err = run_cli(["batch", a, b, "--out", out, *FAST], capsys)
    assert (code, err) == (0, [])
    untouched.check()   # elsewhere/ is still empty
    assert os.readlink(out / "a") == str(elsewhere) and os.readlink(out / "b") == str(elsewhere)
    folders = {r["input"]: r["folder"] for r in _records(out)}
    assert folders == {str(a): "a-2", str(b): "b-2"}


def test_a_link_planted_as_an_output_file_is_replaced_not_written_through(tmp_path, capsys):
    a = tmp_path / "a.png"
    photo(a, 8)
    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    assert run_cli(["batch", a, "--out", out, *FAST], capsys)[0] == 0
    (out / "a" / "grid.png").unlink()
    os.symlink(victim, out / "a" / "grid.png")
    os.symlink(victim, out / "a" / "vanilla_gradient.npy.link")   # not a run file: left as it is
    untouched = Untouched(tmp_path, out)
    assert run_cli(["batch", a, "--out", out, *FAST], capsys)[0] == 0
    untouched.check()
    assert not (out / "a" / "grid.png").is_symlink() and (out / "a" / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["config.toml", "manifest.jsonl", "index.html"])
def test_a_link_planted_as_a_run_file_is_refused(tmp_path, capsys, name):
    a = tmp_path / "a.png"
    photo(a, 9)
    out = tmp_path / "out"
    assert run_cli(["explain", a, "--out", out, *FAST], capsys)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / name).unlink()
    os.symlink(victim, out / name)
    untouched = Untouched(tmp_path, out)
    kept = Kept(out)
    expect_error(["batch", a, "--out", out, *FAST], capsys, repr(str(out / name)), "not a regular file")
    untouched.check()
    kept.check()


# ---- the manifest, read back -----------------------------------------------------------------------
def test_manifest_fields_are_escaped_in_the_report(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    photo(a, 10)
    photo(b, 11)
    out = tmp_path / "out"
    assert run_cli(["batch", a, b, "--out", out, *TINY, "--method", "smoothgrad"], capsys)[0] == 0
    first, second = _records(out)
    # Someone else edits the manifest: script in a label, a class name and the layer of a
    # record that is otherwise right; a target and a sample count of the wrong type in another.
    first["label"] = "<script>alert('label')</script>"
    first["top5"][0]["label"] = "<img src=x onerror=alert('top5')>"
    first["backend"] = "<script>alert('backend')</script>"
    second["target"] = "<script>alert('target')</script>"
    second["methods"]["smoothgrad"]["samples"] = "<script>alert('samples')</script>"
    (out / "manifest.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    untouched = Untouched(tmp_path, out)
    code, stdout, err = run_cli(["batch", a, b, "--out", out, *TINY, "--method", "smoothgrad"], capsys)
    assert (code, err) == (0, [])
    untouched.check()
    assert "(1 done before)" in stdout   # the record of the wrong shape was explained again
    report = (out / "index.html").read_text()
    assert "<script>alert" not in report and "<img src=x" not in report
    assert "&lt;script&gt;alert(&#x27;label&#x27;)" in report


def test_a_manifest_that_is_a_folder_is_refused_in_one_line(tmp_path, capsys):
    a = tmp_path / "a.png"
    photo(a, 12)
    out = tmp_path / "out"
    (out / "manifest.jsonl").mkdir(parents=True)
    untouched = Untouched(tmp_path)
    expect_error(["batch", a, "--out", out, *FAST], capsys, repr(str(out / "manifest.jsonl")), "not a regular file")
    untouched.check()


def test_manifest_records_of_the_wrong_shape_are_explained_again(tmp_path, capsys):
    a = tmp_path / "a.png"
    photo(a, 13)
    out = tmp_path / "out"
    assert run_cli(["batch", a, "--out", out, *FAST], capsys)[0] == 0
    good = (out / "manifest.jsonl").read_text()
    wrong = [[1, 2], "text", 3.5, None, {"input": 3}, {"input": str(a), "status": "ok", "folder": "a", "methods": []},
             {"input": str(a), "status": "ok", "folder": ["a"]}, {"input": str(a), "status": "ok", "folder": "a",
                                                                   "methods": {"vanilla_gradient": 1}}]
    for record in wrong:
        (out / "manifest.jsonl").write_text(good + json.dumps(record) + "\n")
        untouched = Untouched(tmp_path, out)
        code, stdout, err = run_cli(["batch", a, "--out", out, *FAST], capsys)
        assert (code, err) == (0, []), (record, err)
        untouched.check()
        # a later record for the same input replaces the good one only when it is a record
        assert "1 of 1 inputs explained" in stdout
        assert [r["status"] for r in _records(out)] == ["ok"]


# ---- output folders a run cannot use ---------------------------------------------------------------
def test_an_output_folder_that_is_a_file_or_under_a_file(tmp_path, capsys):
    a = tmp_path / "a.png"
    photo(a, 14)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    untouched = Untouched(tmp_path)
    expect_error(["explain", a, "--out", blocker, *FAST], capsys, repr(str(blocker)), "is a file")
    expect_error(["explain", a, "--out", blocker / "deeper" / "out", *FAST], capsys,
                 repr(str(blocker)), "is a file")
    untouched.check()
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    untouched = Untouched(tmp_path)
    expect_error(["explain", a, "--out", tmp_path / "broken", *FAST], capsys, "broken symbolic link")
    untouched.check()


def test_an_output_folder_holding_someone_elses_report_is_refused(tmp_path, capsys):
    a = tmp_path / "a.png"
    photo(a, 15)
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("<h1>my home page</h1>")
    untouched = Untouched(tmp_path)
    expect_error(["explain", a, "--out", out, *FAST], capsys, "holds a index.html that no multisal run wrote")
    untouched.check()


def test_a_read_only_output_folder(tmp_path, capsys):
    a = tmp_path / "a.png"
    photo(a, 16)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        # Root writes into read-only folders whatever their mode (unless it runs without
        # CAP_DAC_OVERRIDE): then there is nothing to test.
        if os.geteuid() == 0 and os.access(out, os.W_OK):
            pytest.skip("root writes into read-only folders whatever their mode")
        untouched = Untouched(tmp_path)
        expect_error(["explain", a, "--out", out, *FAST], capsys, repr(str(out)), "not writable")
        expect_error(["explain", a, "--out", out / "sub", *FAST], capsys, repr(str(out)), "not writable")
        untouched.check()
    finally:
        out.chmod(0o755)


def test_a_full_disk_at_the_final_manifest_write(tmp_path, capsys, monkeypatch):
    a = tmp_path / "a.png"
    photo(a, 17)
    out = tmp_path / "out"
    rewrite = runs.Manifest.rewrite
    calls = []

    def full_at_the_end(self, order=None):
        calls.append(order)
        if len(calls) == 2:   # the first rewrite records the pending inputs, the second ends the run
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return rewrite(self, order)

    monkeypatch.setattr(runs.Manifest, "rewrite", full_at_the_end)
    untouched = Untouched(tmp_path, out)
    expect_error(["explain", a, "--out", out, *FAST], capsys, repr(str(out / "manifest.jsonl")),
                 "No space left on device", code=1)
    untouched.check()
    # What was appended before the disk filled up still counts: the rerun finds the image done.
    monkeypatch.setattr(runs.Manifest, "rewrite", rewrite)
    code, stdout, err = run_cli(["batch", a, "--out", out, *FAST], capsys)
    assert (code, err) == (0, []) and "(1 done before)" in stdout


# ---- what the run writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_get_the_umasks_permissions(tmp_path, capsys, umask, file_mode, folder_mode):
    a = tmp_path / "a.png"
    photo(a, 18)
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        assert run_cli(["explain", a, "--out", out, *FAST], capsys)[0] == 0
    finally:
        os.umask(previous)
    paths = [out, *out.rglob("*")]
    assert len(paths) > 5
    for path in paths:
        want = folder_mode if path.is_dir() else file_mode
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode & 0o777))


def test_a_file_name_starting_with_a_dash_is_done_once(tmp_path, capsys):
    photos = tmp_path / "photos"
    photo(photos / "-x.png", 19)
    out = tmp_path / "out"
    assert run_cli(["batch", photos, "--out", out, *FAST], capsys)[0] == 0
    untouched = Untouched(tmp_path, out)
    code, stdout, err = run_cli(["batch", photos, "--out", out, *FAST], capsys)
    assert (code, err) == (0, []) and "1 of 1 inputs explained (1 done before)" in stdout
    untouched.check()
    # on the command line such a name needs "--" (argparse would read it as an option)
    code, stdout, err = run_cli(["batch", *FAST, "--out", out, "--", photos / "-x.png"], capsys)
    assert code == 0 and "(1 done before)" in stdout


def test_a_glob_that_covers_the_output_folder_skips_the_runs_own_files(tmp_path, capsys):
    photo(tmp_path / "a.png", 20)
    photo(tmp_path / "b.png", 21)
    out = tmp_path / "out"
    pattern = str(tmp_path / "**" / "*.png")
    assert run_cli(["batch", pattern, "--out", out, *FAST], capsys)[0] == 0
    untouched = Untouched(tmp_path, out)
    code, stdout, err = run_cli(["batch", pattern, "--out", out, *FAST], capsys)
    assert (code, err) == (0, []) and "2 of 2 inputs explained (2 done before)" in stdout
    untouched.check()
    assert sorted(r["input"] for r in _records(out)) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_escape_sequences_in_file_names_reach_the_terminal_escaped(tmp_path, capsys):
    photos = tmp_path / "photos"
    photo(photos / "ok.png", 22)
    bad = photos / "red\x1b[31m.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    untouched = Untouched(tmp_path, out)
    line = expect_one_failure(["explain", photos, "--out", out, *FAST], capsys,
                              str(bad).replace("\x1b", "\\x1b"), "cannot identify image file")
    assert "\x1b" not in line and "\\x1b[31m" in line
    # and in the one line of an error that is no input's
    line = expect_error(["explain", photos, "--config", tmp_path / "job\x1b[2J.toml", "--out", out], capsys,
                        "job\\x1b[2J.toml", "not found")
    assert "\x1b" not in line
    untouched.check()


# ---- Ctrl-C -------------------------------------------------------------------------------------
@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_stops_with_130_and_one_line(tmp_path, debug):
    photos = tmp_path / "photos"
    for i in range(200):
        photo(photos / f"img{i:03d}.png", i)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "multisal.app.cli", "batch", str(photos), "--out", str(out), *TINY,
               "--method", "vanilla_gradient,gradcam_pp", "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MULTISAL_DEBUG", None)
    if debug:
        env["MULTISAL_DEBUG"] = "1"
    untouched = Untouched(tmp_path, out)
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if manifest.exists() and manifest.read_text().count('"status": "ok"') >= 4:
            break
        time.sleep(0.01)
    assert job.poll() is None, f"the job ended before Ctrl-C: {job.stderr.read()}"
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=60)
    untouched.check()
    if debug:   # MULTISAL_DEBUG=1 lets the traceback through, for whoever debugs
        assert "Traceback" in err and "KeyboardInterrupt" in err
        return
    assert job.returncode == 130, err
    assert err.splitlines() == ["multisal: interrupted (a batch run resumes where it stopped)"], err
