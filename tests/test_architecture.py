"""The package's structure is its architecture (shared/DESIGN.md "Layout"): subpackages by job, ordered in
layers; a module never imports a higher layer (not even inside a function), and the imports have no cycle.
This walks every `import` in shardckpt/ with ast, so it needs no process group and imports nothing."""
from __future__ import annotations

import ast
import os

import shardckpt

PKG = os.path.dirname(shardckpt.__file__)

# lowest first; a module may import its own layer and those below it
LAYERS = [
    ["errors", "config", "progress", "_faults", "dist"],
    ["native", "_native"],
    ["storage", "testing"],
    ["format"],
    ["plan"],
    ["lifecycle"],
    ["saving"],
    ["loading"],
    ["api"],
    ["tiers"],
    ["manager"],
    ["tools", "integrations", "cli", "dcp", "__init__", "__main__"],
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def _imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package modules it imports (absolute or relative, at any depth of the file)."""
    known = set(mods) | {"shardckpt._native"}
    edges = {}
    for mod, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        is_pkg = path.endswith("__init__.py")
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "shardckpt":
                    target = node.module
                else:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out.add(sub if sub in known else target)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == "shardckpt")
        edges[mod] = {t for t in out if t in known and t != mod}
    return edges


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYER_OF["__init__" if len(parts) == 1 else parts[1]]


def test_every_module_has_a_layer():
    assert [m for m in _modules() if (m.split(".") + ["__init__"])[1] not in LAYER_OF] == []


def test_no_module_imports_a_higher_layer():
    edges = _imports(_modules())
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if _layer(t) > _layer(m))
    assert upward == []


def test_no_import_cycles():
    edges = _imports(_modules())
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))
    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_private_names_across_modules():
    """`from shardckpt.x import _name` of another module: what another module needs is its documented API."""
    mods = _modules()
    crossing = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardckpt"):
                crossing += [f"{mod}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")
                             and f"{node.module}.{a.name}" not in ("shardckpt._native", "shardckpt._faults")]
    assert crossing == []


def test_long_modules_and_functions_say_why():
    """Small files with one job (shared/STYLE.md 10): a module over ~400 lines or a function over ~80 says
    why in its docstring ("Why one module", "Long because")."""
    long = []
    for mod, path in _modules().items():
        src = open(path).read()
        tree = ast.parse(src, path)
        if src.count("\n") > 420 and "Why one module" not in (ast.get_docstring(tree) or ""):
            long.append(f"{mod}: {src.count(chr(10))} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80 \
                    and "Long because" not in (ast.get_docstring(node) or ""):
                long.append(f"{mod}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
