"""The layers import one way (issue 15; docs/design.md, "Layout"): bindings → kernels → reference, no cycle
anywhere, the reference with NumPy alone, and `import clearmaps` lazy. Checked on the source (a walk of every
module's imports) and in subprocesses where torch and Numba cannot be imported at all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"reference": "clearmaps.reference", "kernels": "clearmaps.kernels", "bindings": "clearmaps"}
# a meta-path finder that refuses torch and numba, installed before anything is imported
BLOCK = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "numba", "numba_cuda"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Refuse())
"""


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rest = path.relative_to(ROOT / folder).with_suffix("").parts
    rest = rest[:-1] if rest[-1] == "__init__" else rest
    return ".".join((PACKAGES[folder], *rest))


def _imports_at_import_time(path: Path, name: str) -> set:
    """Modules of clearmaps that ``path`` imports when it is imported: module-level statements (imports inside
    functions run later, on use, and are how the layers stay lazy)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        stmts = [node] + ([n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                          if isinstance(node, (ast.If, ast.Try)) else [])
        for s in stmts:
            if isinstance(s, ast.Import):
                found.update(a.name for a in s.names if a.name.startswith("clearmaps"))
            elif isinstance(s, ast.ImportFrom):
                if s.level:
                    base = package.rsplit(".", s.level - 1)[0] if s.level > 1 else package
                    mod = f"{base}.{s.module}" if s.module else base
                else:
                    mod = s.module or ""
                if mod.startswith("clearmaps"):
                    if s.module:  # "from . import x" imports x; the package itself is already being imported
                        found.add(mod)
                    found.update(f"{mod}.{a.name}" for a in s.names)
    return found


def _graph():
    modules = {}
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            modules[_module_name(path)] = path
    return {name: {m for m in _imports_at_import_time(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def _layer(name: str) -> str:
    if name.startswith("clearmaps.reference"):
        return "reference"
    if name.startswith("clearmaps.kernels"):
        return "kernels"
    return "bindings"


def test_imports_point_down_only():
    rank = {"reference": 0, "kernels": 1, "bindings": 2}
    wrong = [(a, b) for a, deps in _graph().items() for b in deps if rank[_layer(b)] > rank[_layer(a)]]
    assert not wrong, f"imports that point up a layer: {wrong}"


def test_no_import_cycle():
    graph = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(state) > 40  # the walk saw the package, not an empty folder


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_the_reference_needs_numpy_alone():
    proc = _run("""
import numpy as np
import clearmaps.reference as ref
net = ref.Network([ref.Conv(np.ones((2, 1, 3, 3)), np.zeros(2)), ref.ReLU(), ref.Conv(np.ones((3, 2, 1, 1)), np.zeros(3))])
e = ref.clear_from_trace(net, ref.forward(net, np.ones((1, 1, 6, 6))), None)
assert e.rgb.shape == (1, 6, 6, 3)  # the map is in the image's space
assert not any(m.split('.')[0] in ('torch', 'numba') for m in sys.modules)
print('ok')
""")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_import_clearmaps_is_lazy():
    """`import clearmaps` and its light names work without torch or Numba; a name that needs torch says so
    when it is used, not at import."""
    proc = _run("""
import clearmaps
assert clearmaps.__version__ and clearmaps.Network and clearmaps.ClearmapsError
assert not any(m.split('.')[0] in ('torch', 'numba') for m in sys.modules), sorted(sys.modules)
try:
    clearmaps.from_torch(None)
except Exception as exc:
    print(type(exc).__name__)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("ImportError", "ModuleNotFoundError", "ClearmapsError"), proc.stdout
