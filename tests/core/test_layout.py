"""The package's layout, read from its import graph: the core imports no framework, no OpenCV,
Pillow or tqdm and none of the application; there is no import cycle; and no function imports a
module (heavy modules are named once, at a module's top, with multisal.frameworks.lazy_import)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> the package it is installed as (setup.cfg's package_dir).
PACKAGES = {"multisal": "multisal", "backends": "multisal.backends", "models": "multisal.models"}
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "chainer", "ray", "cv2", "PIL", "tqdm", "skimage",
         "matplotlib", "scipy")
# The designed dynamic imports: the registry's built-in backends, the package's lazily resolved
# names, lazy_import itself, and a configuration's "package.module:factory".
IMPORT_MODULE_ALLOWED = {"multisal.registry", "multisal", "multisal.frameworks", "multisal.modelspec"}


def _modules():
    """{module name: (path, ast)} of every module the package installs."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


MODULES = _modules()


def _is_package(name):
    return MODULES[name][0].name == "__init__.py"


def _resolve(module, node):
    """The internal modules an import statement of `module` reads (submodules where it names one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    target = node.module if node.level == 0 else ".".join(p for p in (base, node.module) if p)
    names = [f"{target}.{alias.name}" for alias in node.names]
    return [n for n in names if n in MODULES] or [target]


def _module_level_imports(tree):
    """Import statements outside any function (in try/if blocks and class bodies too)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)
    visit(tree)
    return found


def _lazy_targets(tree):
    return [call.args[0].value for call in ast.walk(tree) if isinstance(call, ast.Call)
            and getattr(call.func, "id", None) == "lazy_import" and call.args
            and isinstance(call.args[0], ast.Constant)]


def _graph():
    graph = {}
    for name, (_path, tree) in MODULES.items():
        edges = set()
        for node in _module_level_imports(tree):
            edges.update(t for t in _resolve(name, node) if t in MODULES and t != name)
        edges.update(t for t in _lazy_targets(tree) if t in MODULES)
        graph[name] = edges
    return graph


def test_no_function_imports_a_module():
    offenders = []
    for name, (path, tree) in MODULES.items():
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                offenders += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(func)
                              if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not offenders, f"function-level imports (name the module at the top, lazily if heavy): {offenders}"


def test_dynamic_imports_are_the_designed_ones():
    callers = {name for name, (_path, tree) in MODULES.items() for call in ast.walk(tree)
               if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "import_module"}
    assert callers <= IMPORT_MODULE_ALLOWED, callers - IMPORT_MODULE_ALLOWED


def test_heavy_modules_are_imported_lazily():
    """A module of the package imports a framework or heavy library only through lazy_import,
    except the PyTorch model definitions, which are themselves imported lazily (models/__init__)."""
    torch_modules = {"multisal.models.efficientnet_lite", "multisal.models.vgg16"}
    offenders = []
    for name, (path, tree) in MODULES.items():
        for node in _module_level_imports(tree):
            heavy = [t for t in _resolve(name, node) if t.split(".")[0] in HEAVY]
            if heavy and name not in torch_modules:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {heavy}")
    assert not offenders, offenders
    lazily = {t for _path, tree in MODULES.values() for t in _lazy_targets(tree) if t in MODULES}
    assert torch_modules <= lazily


def test_no_import_cycle():
    graph = _graph()
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for nxt in sorted(graph[name]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_core_never_imports_the_application():
    core = {name for name in MODULES if name.startswith("multisal.") and not name.startswith(
        ("multisal.app", "multisal.backends", "multisal.models"))} | {"multisal"}
    graph = _graph()
    for name in core:
        assert not any(t.startswith("multisal.app") for t in graph[name]), (name, graph[name])


def test_importing_the_core_imports_no_framework_or_application():
    core = sorted(name for name in MODULES if not name.startswith(("multisal.app", "multisal.models.")))
    code = (f"import importlib, sys\nfor m in {core!r}:\n    importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith('multisal.app'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def test_public_names_resolve():
    """Every name of __all__ is there, those of the application and the ONNX tools on first use."""
    import multisal as ms
    for name in ms.__all__:
        assert getattr(ms, name) is not None, name
