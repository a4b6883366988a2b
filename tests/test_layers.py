"""The folder tree is the architecture: imports point one way only (a lower layer never imports a higher one)."""
import ast
from pathlib import Path

import uvclab

PKG = Path(uvclab.__file__).parent
# low -> high; the top-level base modules (errors, paths, io_utils) are below every subpackage
LAYERS = ["base", "vit", "prune", "uvc", "engine", "compare", "ui"]


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "base"


def imported_uvclab_modules(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[:-node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("uvclab"):
                found.add(name)
                found.update(f"{name}.{a.name}" for a in node.names)  # `from uvclab.vit import macs`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("uvclab"))
    return found


def test_every_import_points_down():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts)
        if path.name == "__init__.py" and path.parent == PKG or path.name == "__main__.py":
            continue  # the package's public API and entry point sit on top of everything
        mine = LAYERS.index(layer_of(module))
        for target in imported_uvclab_modules(path, module):
            if target == "uvclab":  # `from uvclab import __version__`
                continue
            if LAYERS.index(layer_of(target)) > mine:
                bad.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not bad, "imports that point up a layer:\n" + "\n".join(sorted(bad))


def test_layer_check_catches_an_upward_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from uvclab.ui.viz import plot_masks\nfrom uvclab.vit import macs\n")
    found = imported_uvclab_modules(f, "uvclab.vit.m")
    assert "uvclab.ui.viz" in found and layer_of("uvclab.ui.viz") == "ui"
    assert LAYERS.index(layer_of("uvclab.ui.viz")) > LAYERS.index(layer_of("uvclab.vit.m"))


def test_modules_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"modules over 400 lines (split them by role): {big}"
