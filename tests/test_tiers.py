"""The two test tiers of conftest.py: plain `pytest` neither executes notebooks nor runs slow/browser tests,
`pytest --full` does; every test session writes its runs to a temporary folder, never into runs/.
The tier rules are checked in a scratch project (pytester) that uses the repository's conftest.py."""
from __future__ import annotations

import os

import nbformat

from uvclab.paths import REPO_ROOT, notebook_runs, runs_dir

TESTS = """
import pytest

def test_fast():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.browser
def test_browser():
    pass
"""


def _project(pytester):
    pytester.makeconftest((REPO_ROOT / "conftest.py").read_text())
    pytester.makeini("[pytest]\naddopts = --nbval-lax\nmarkers =\n    slow: slow\n    browser: browser\n")
    pytester.makepyfile(test_tiers_demo=TESTS)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(pytester.path / "demo.ipynb"))


def _collected(result) -> set[str]:
    return {line.split("::", 1)[1] for line in result.outlines if "::" in line}


def test_fast_tier_skips_notebooks_and_slow_tests_full_tier_runs_them(pytester):
    _project(pytester)
    fast = pytester.runpytest_inprocess("--collect-only", "-q")
    assert _collected(fast) == {"test_fast"} and any("2 deselected" in line for line in fast.outlines)
    full = pytester.runpytest_inprocess("--collect-only", "-q", "--full")
    assert _collected(full) == {"test_fast", "test_slow", "test_browser", "Cell 0"}   # Cell 0: nbval's notebook item
    assert _collected(pytester.runpytest_inprocess("--collect-only", "-q", "-m", "slow")) == {"test_slow"}


def test_runs_go_to_a_temporary_folder():
    root = runs_dir()
    assert root.is_absolute() and root.is_dir() and REPO_ROOT not in root.parents
    assert notebook_runs() == root / "notebooks"               # where the notebooks' kernels write (nbval)
    assert os.environ["UVCLAB_RUNS"] == str(root)
