"""The package's shape: imports point one way (commands -> knn / lm -> data -> util), no
module imports another that imports it back, and every module imports on its own."""
import ast
import subprocess
import sys
from pathlib import Path

import knnlm

ROOT = Path(knnlm.__file__).parent

# lower layers never import higher ones; lm and knn are peers that keep apart, except
# that the pure kNN math is a leaf anything may use (training's interpolated loss)
LAYERS = {"knnlm.util": 0, "knnlm.io": 0, "knnlm.hub": 0, "knnlm.distributed": 0,
          "knnlm.guard": 0,
          "knnlm.data": 1, "knnlm.lm": 2,
          "knnlm.knn": 2, "knnlm.analysis": 4, "knnlm.cli": 5, "knnlm.__main__": 5}
COMMAND_LAYER = 3          # evaluate, build_dstore, generate, neighbors, demo
SHARED_LEAVES = {"knnlm.knn.math"}


def module_names() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def imports_of(name: str, path: Path, mods: dict) -> set[str]:
    """The knnlm modules ``name`` imports, at any depth of its code (lazy imports too)."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            found = subs or [target]       # modules imported by name, else the module itself
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        else:
            continue
        out.update(m for m in found if m in mods and m != name)
    return out


def layer(name: str) -> int:
    for prefix, level in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return level
    return COMMAND_LAYER


def family(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_imports_point_one_way():
    mods = module_names()
    wrong = []
    for name, path in mods.items():
        if name == "knnlm":
            continue
        for dep in imports_of(name, path, mods):
            if dep in SHARED_LEAVES or dep == "knnlm":
                continue
            up = layer(dep) > layer(name)
            sideways = layer(dep) == layer(name) == 2 and family(dep) != family(name)
            if up or sideways:
                wrong.append(f"{name} -> {dep}")
    assert not wrong, "imports against the layering: " + ", ".join(sorted(wrong))


def test_no_import_cycles():
    mods = module_names()
    graph = {m: imports_of(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}     # 1: on the DFS stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_every_module_imports_first():
    """Each module imported first, in a fresh module table (an order-dependent cycle would
    fail for some entry point)."""
    names = sorted(n for n in module_names() if n != "knnlm.__main__")
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    for m in [m for m in sys.modules if m == 'knnlm' or m.startswith('knnlm.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
