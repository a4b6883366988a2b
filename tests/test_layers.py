"""The folder tree is the architecture: imports point one way only (a lower layer never imports a higher one)
and no two modules import each other, directly or round a loop (function-level imports included)."""
import ast
from pathlib import Path

import uvclab

PKG = Path(uvclab.__file__).parent
# low -> high; the top-level base modules (errors, paths, io_utils, ranks, version) are below every subpackage
LAYERS = ["base", "vit", "prune", "uvc", "engine", "compare", "ui"]


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


def module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imported_uvclab_modules(path: Path, module: str) -> set[str]:
    """Every uvclab module `path` imports, anywhere in the file (`from a.b import c` names a.b and a.b.c)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("uvclab"):
                found.add(name)
                found.update(f"{name}.{a.name}" for a in node.names)  # `from uvclab.vit import macs`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("uvclab"))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the uvclab modules it imports (only names that are modules of the package)."""
    paths = {module_of(p): p for p in PKG.rglob("*.py")}
    return {m: {t for t in imported_uvclab_modules(p, m) if t in paths and t != m} for m, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (strongly connected, Tarjan), sorted."""
    index, low, stack, out = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                out.append(sorted(group))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_every_import_points_down():
    bad = []
    for module, targets in import_graph().items():
        if module in ("uvclab", "uvclab.__main__"):
            continue  # the package's public API and entry point sit on top of everything
        bad += [f"{module} ({layer_of(module)}) imports {t} ({layer_of(t)})" for t in targets
                if t == "uvclab" or LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(module))]
    assert not bad, "imports that point up a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "modules that import each other (round a loop):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_layer_check_catches_an_upward_import_and_a_cycle(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from uvclab.ui.viz import plot_masks\nfrom uvclab.vit import macs\n")
    found = imported_uvclab_modules(f, "uvclab.vit.m")
    assert "uvclab.ui.viz" in found and layer_of("uvclab.ui.viz") == "ui"
    assert LAYERS.index(layer_of("uvclab.ui.viz")) > LAYERS.index(layer_of("uvclab.vit.m"))
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert cycles(g) == [["a", "b", "c"], ["e", "e2"]]
    f.write_text("def late():\n    from uvclab.vit.export import export_model\n")  # a function-level import counts
    assert "uvclab.vit.export" in imported_uvclab_modules(f, "uvclab.vit.macs")


def test_modules_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"modules over 400 lines (split them by role): {big}"
