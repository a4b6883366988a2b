"""Every `uvclab.<name>` that README.md, docs/*.md, notebooks/README.md and the notebooks mention resolves.

A dotted name resolves when its longest importable prefix is a module and the rest are attributes of it
(`uvclab.ui.widgets.explorer`: module uvclab.ui.widgets, attribute explorer). File names that share the
prefix (`uvclab.json`) are not module references. Stale names in the docs teach users calls that fail.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\buvclab(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
FILE_SUFFIXES = {"json", "yaml", "yml", "py", "md", "safetensors", "onnx", "txt", "png", "csv"}


def documents() -> dict[str, str]:
    """Relative path -> text: the Markdown files, and every notebook cell's source (markdown and code)."""
    docs = {str(p.relative_to(ROOT)): p.read_text() for p in
            [ROOT / "README.md", ROOT / "notebooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
            if p.is_file()}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        docs[str(nb.relative_to(ROOT))] = "\n".join("".join(c.get("source", [])) for c in cells)
    return docs


def referenced_names(text: str) -> set[str]:
    return {m for m in NAME.findall(text) if m.rsplit(".", 1)[-1] not in FILE_SUFFIXES}


def resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_resolver_tells_real_from_stale_names():
    assert resolves("uvclab.ui.widgets.explorer") and resolves("uvclab.compare_runs") and resolves("uvclab.vit")
    assert not resolves("uvclab.widgets.explorer") and not resolves("uvclab.baselines.magnitude_structure")
    assert referenced_names("see uvclab.json and `uvclab.vit.export.export_model(m)`.") == {
        "uvclab.vit.export.export_model"}


@pytest.mark.parametrize("doc", sorted(documents()))
def test_every_uvclab_name_resolves(doc):
    names = referenced_names(documents()[doc])
    bad = sorted(n for n in names if not resolves(n))
    assert not bad, f"{doc} names {bad}, which do not import: use the current module paths"
