#!/usr/bin/env python
"""The pictures at the top of the README (docs/showcase-<photo>.png), made by the demo's code path.

`make demo` writes the same pictures to out/demo/showcase-<photo>.png; this script makes only
those: the demo's configuration on the torch backend, limited to two photos and to the methods
the pictures show (multisal.app.demo.SHOWCASE), then the demo's showcase().

    .venv/bin/python scripts/readme_pictures.py [--out docs] [--work DIR]

With --work the run is kept there, and a second call resumes it (multisal batch): redrawing the
pictures then explains nothing again.
"""
import argparse
import shutil
import sys
import tempfile

from multisal.app.demo import SHOWCASE, demo_config, showcase
from multisal.app.runs import run_batch
from multisal.methods import METHODS

PHOTOS = ("chelsea", "coffee")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder of the pictures (default: docs)")
    parser.add_argument("--work", help="keep the run in this folder (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="multisal-readme-")
    try:
        shown = {name for name, _, _ in SHOWCASE}
        config = dict(demo_config("torch", work), inputs=[f"skimage:{p}" for p in PHOTOS],
                      methods=[name for name in METHODS if name in shown])
        run = run_batch(config, progress=sys.stderr.isatty())
        for record in run.failed:
            print(f"failed: {record['input']}: {record['error']}", file=sys.stderr)
            return 1
        for path in showcase(run, args.out):
            print(f"wrote {args.out}/{path}")
    finally:
        if not args.work:
            shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
