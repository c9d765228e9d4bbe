"""Helpers of the hostile-input tests (tests/app/test_hostile_*.py): a snapshot of a folder tree,
a command-line runner that holds a run to the one-line error contract, a guard against hangs,
and the fixtures' makers (photos, tiny ONNX classifiers).

The contract these check (multisal.app.cli): every error a user can cause ends in exactly one line
on stderr, "multisal: error: ..." (exit status 2, before anything is written) or one
"multisal: failed: INPUT: reason" line per failed input (exit status 1), never a traceback; and
nothing outside the output folder is written or removed.
"""
import contextlib
import hashlib
import os
import signal
import stat
from pathlib import Path

import cv2
import numpy as np

from multisal.app.cli import main

TINY = ["--model", "tiny_models:classifier", "--preset", "raw", "--size", "32", "32"]


# ---- what is on disk --------------------------------------------------------------------------
def tree(root, skip=()):
    """{path relative to root: (type, size, mode, sha256 of the content or the link's target)} of
    every entry under root, not following links, leaving out the folders in `skip` (and all under
    them). FIFOs and devices are listed, never opened (opening a FIFO blocks)."""
    root = Path(root)
    skipped = {Path(os.path.abspath(s)) for s in skip}
    found = {}

    def visit(folder):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if path in skipped:
                continue
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", 0, mode, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", 0, mode, "")
                visit(path)
            elif stat.S_ISREG(info.st_mode):
                found[rel] = ("file", info.st_size, mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[rel] = ("other", 0, mode, stat.S_IFMT(info.st_mode))

    visit(root)
    return found


class Untouched:
    """Snapshot of a tree, outside the output folder (and any other folders in `skip`), to check
    after a run that nothing there was written, removed or changed:

        untouched = Untouched(tmp_path, out)
        ... run ...
        untouched.check()
    """

    def __init__(self, root, *skip):
        self.root, self.skip = Path(root), [Path(s) for s in skip]
        self.before = tree(self.root, self.skip)

    def check(self):
        after = tree(self.root, self.skip)
        added = sorted(set(after) - set(self.before))
        removed = sorted(set(self.before) - set(after))
        changed = sorted(p for p in set(after) & set(self.before) if after[p] != self.before[p])
        assert not (added or removed or changed), \
            f"outside the output folder: added {added}, removed {removed}, changed {changed}"


class Kept:
    """Snapshot of every entry under root, to check that each is still there unchanged (the run
    may add its own files beside them): for runs whose output folder holds the user's files."""

    def __init__(self, root):
        self.root = Path(root)
        self.before = tree(self.root)

    def check(self):
        after = tree(self.root)
        lost = sorted(p for p in self.before if p not in after)
        changed = sorted(p for p in self.before if p in after and after[p] != self.before[p])
        assert not (lost or changed), f"the user's files: lost {lost}, changed {changed}"


# ---- the command line -------------------------------------------------------------------------
def run_cli(argv, capsys):
    """(exit status, stdout, stderr lines) of multisal.app.cli.main(argv) in this process;
    argparse's exit (SystemExit) counts as a return."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def expect_error(argv, capsys, *names, code=2, prefix="multisal: error: "):
    """Run the command line and hold it to the contract: exit status `code`, exactly one line on
    stderr starting with `prefix` and naming each of `names`, no traceback. Returns the line."""
    status, out, err = run_cli(argv, capsys)
    assert status == code, (status, out, err)
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(prefix), line
    assert "Traceback" not in line
    for name in names:
        assert name in line, (name, line)
    return line


def expect_one_failure(argv, capsys, source, *names):
    """A run where exactly one input fails (exit status 1, its one line naming it and each of
    `names`) and the others are explained."""
    return expect_error(argv, capsys, *names, code=1, prefix=f"multisal: failed: {source}: ")


# ---- hangs ------------------------------------------------------------------------------------
class Hung(BaseException):
    """Not an Exception: code under test that catches every Exception must not swallow it."""


@contextlib.contextmanager
def deadline(seconds):
    """Fail (raise Hung) instead of hanging for ever: a FIFO's open() or a looping decoder is
    interrupted by SIGALRM (the tests run in the main thread)."""
    def alarm(_signum, _frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- fixtures' makers ---------------------------------------------------------------------------
def photo(path, seed=0, shape=(36, 44, 3)):
    """A random colour photo written with OpenCV; returns its RGB pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])
    return rgb


def onnx_classifier(nodes=(), initializers=(), opset=17, input_type=None, extra_opsets=(), last="features"):
    """A tiny ONNX classifier, input "input" (N,3,8,8): Conv (3 -> 2 channels) -> Relu ->
    [`nodes`, reading and writing `last`] -> GlobalAveragePool -> Flatten -> "logits" (N, 2).
    `nodes` are extra onnx.helper nodes spliced in before the pooling."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "conv.weight")
    graph_nodes = [helper.make_node("Conv", ["input", "conv.weight"], ["conv"], pads=[1, 1, 1, 1]),
                   helper.make_node("Relu", ["conv"], ["features"]),
                   *nodes,
                   helper.make_node("GlobalAveragePool", [last], ["pooled"]),
                   helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(
        graph_nodes, "tiny",
        [helper.make_tensor_value_info("input", input_type or TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [weight, *initializers])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model
