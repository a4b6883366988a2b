"""Two test tiers, and a private runs folder for every test session.

  pytest -q          fast tier: unit and small integration tests; the notebooks are parsed and their parameters
                     validated (tests/test_notebooks.py) but not executed; `slow` and `browser` tests deselected
  pytest -q --full   everything: nbval executes the committed notebooks, plus the slow, torchrun and browser tests
An explicit `-m EXPR` selects by markers as usual (`pytest -m slow tests/test_compress.py`).

At the repository root so that it also governs the collection of notebooks/ (nbval). Runs made by tests (and
by the notebooks nbval executes, whose kernels inherit the environment) go to a temporary UVCLAB_RUNS, never
into the repository's runs/ or the user's own $UVCLAB_RUNS.
"""
from __future__ import annotations

import os
import shutil
import tempfile

FULL_ONLY_MARKERS = ("slow", "browser")
pytest_plugins = ["pytester"]   # tests/test_tiers.py checks these rules in a scratch project


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="the full tier: also execute the notebooks (nbval) and run the slow, torchrun and browser "
                          "tests (~25 min on 2 cores)")


def pytest_configure(config):
    config._uvclab_runs = tempfile.mkdtemp(prefix="uvclab-test-runs-")
    config._uvclab_saved_runs = os.environ.get("UVCLAB_RUNS")
    os.environ["UVCLAB_RUNS"] = config._uvclab_runs


def pytest_unconfigure(config):
    saved = getattr(config, "_uvclab_saved_runs", None)
    if saved is None:
        os.environ.pop("UVCLAB_RUNS", None)
    else:
        os.environ["UVCLAB_RUNS"] = saved
    shutil.rmtree(getattr(config, "_uvclab_runs", ""), ignore_errors=True)


def pytest_report_header(config):
    if config.getoption("full"):
        return "uvclab: full tier (notebooks executed by nbval, slow and browser tests included)"
    return "uvclab: fast tier (notebooks parsed, not executed; slow and browser tests deselected: --full runs them)"


def pytest_ignore_collect(collection_path, config):
    """Notebooks are executed by nbval only in the full tier."""
    if collection_path.suffix == ".ipynb" and not config.getoption("full"):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("full") or config.getoption("markexpr"):   # `-m slow` etc.: the user chose
        return
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in FULL_ONLY_MARKERS) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
