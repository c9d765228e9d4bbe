"""Packaging: import multisal pulls in no framework; a wheel built from the tree installs the
three packages (multisal, multisal.backends, multisal.models)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_multisal_imports_no_framework():
    code = ("import sys, multisal, multisal.models;"
            "bad = [m for m in ('torch', 'onnxruntime', 'onnx', 'chainer', 'ray') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_framework_names_the_extra(monkeypatch):
    import multisal as ms
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # makes `import onnxruntime` fail
    with pytest.raises(ms.MultisalError, match=r"pip install 'multisal\[onnx\]'"):
        ms.load_backend("onnx", model="m.onnx")


def test_unknown_backend():
    import multisal as ms
    with pytest.raises(ms.MultisalError, match="unknown backend 'tf'.*torch, onnx, chainer"):
        ms.load_backend("tf", model=None)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """sdist first, then the wheel from the unpacked sdist: nothing stale from the tree gets in."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    found, = out.glob("multisal-*.whl")
    return found


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("multisal/__init__.py", "multisal/backend.py", "multisal/methods/smoothgrad.py",
                   "multisal/backends/torch/backend.py", "multisal/models/__init__.py",
                   "multisal/presets.py", "multisal/models/efficientnet_lite.py", "multisal/app/cli.py",
                   "multisal/backends/onnx/grad/rules/__init__.py", "multisal/backends/chainer/backend.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and b"multisal = multisal.app.cli:main" in zipfile.ZipFile(wheel).read(entry[0])


def _fresh_venv(tmp_path):
    """A new venv that borrows this environment's dependencies through a plain path in a .pth file
    (so nothing is fetched), but not its editable multisal: that needs a site dir's own .pth files."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    borrowed = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site) / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    return venv


def _check_installed(venv, tmp_path):
    py = venv / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import multisal, multisal.backends.torch.backend, multisal.models, "
                          "multisal.methods.cam; print(multisal.__file__)"],
                         check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.startswith(str(venv)), out.stdout
    listed = subprocess.run([str(venv / "bin" / "multisal"), "methods"], capture_output=True, text=True, cwd=tmp_path)
    assert listed.stdout.startswith("vanilla_gradient"), listed.stderr


def test_wheel_installs_in_a_fresh_venv(wheel, tmp_path):
    venv = _fresh_venv(tmp_path)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    _check_installed(venv, tmp_path)


def test_pip_install_dot_in_a_fresh_venv(tmp_path):
    venv = _fresh_venv(tmp_path)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", str(ROOT)], check=True, cwd=tmp_path)
    _check_installed(venv, tmp_path)
