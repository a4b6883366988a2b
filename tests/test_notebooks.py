"""The notebooks: the committed (executed) files are well-formed, and each one runs with tiny parameters.

Fast tier: structure checks read the committed .ipynb files (one `parameters` cell with a help comment per
parameter, executed with outputs, small, no model printouts or progress bars, no pip / sys.path cells, kernel
python3), and each parameters cell is executed on its own and validated (every parameter used, the run
notebooks' parameters build a valid CompressConfig, with their defaults and with the tiny values below).
Full tier (`pytest --full`, slow): the papermill tests execute every notebook into tmp_path with tiny parameters
(digits, a few steps), writing their runs into one shared temporary runs folder so that 06_results and
07_explorer read what 02-04 wrote; the committed outputs themselves are regression-tested by nbval
(`pytest --full notebooks/`).
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Optional

import nbformat
import pytest
import yaml

from uvclab.engine.config import ABLATIONS, CompressConfig, config_from_parameters, sections
from uvclab.engine.strategies import STRATEGIES as METHODS

papermill = pytest.importorskip("papermill")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
MAX_BYTES = 200 * 1024
MAX_TEXT_CHARS = 10000           # one plain-text output (tables, prints); a printed DeiT is ~15k
MAX_HTML_CHARS = 20000           # one HTML output: the explorer's 12-block summary (inline styles) is ~10.5k
MODEL_PRINTOUT = re.compile(r"VisionTransformer\(|Sequential\(|\(qkv\): Linear|GatedBlock\(")

TINY_RUN = dict(dataset="digits", warmup_epochs=1, search_epochs=1, finetune_epochs=1, max_steps_per_epoch=3,
                batch_size=32, threads=1)
TINY = {
    "01_gated_vit_and_budget": dict(equiv_kwargs={"img_size": 32, "patch_size": 16, "depth": 2, "num_classes": 10},
                                    batch_size=2, sweep_points=5),
    "02_mask_learning": dict(TINY_RUN, macs_ratio=0.6, resume=None),      # resume None: tests start fresh
    "03_distillation_ablations": dict(TINY_RUN, macs_ratio=0.6, resume=None),
    "04_pruning_ratios": dict(TINY_RUN, budgets=[0.4, 0.8], resume=None),
    "05_export_and_speed": dict(img_size=32, num_classes=10, batch_size=2, bench_budgets=[0.5],
                                bench_batch_size=4, bench_rounds=1),
    "06_results": dict(baseline_budgets=[0.4], resume=None),   # 04's tiny budgets: one magnitude run at 0.4
    "07_explorer": {},
    "08_compare_runs": dict(TINY_RUN, uvc_budgets=[0.8, 0.4], baselines=["magnitude"], gallery_size=4, resume=None),
    "09_latency_budget": dict(dataset="digits", search_epochs=1, finetune_epochs=1, max_steps_per_epoch=3,
                              batch_size=32, threads=1, macs_ratio=0.6, latency_batch_size=4, table_rounds=1,
                              timing_rounds=3, resume=None),
}
PRODUCERS = ["02_mask_learning", "03_distillation_ablations", "04_pruning_ratios"]   # write runs for 06, 07


def _nb(path: Path):
    return nbformat.read(path, as_version=4)


def _text_outputs(nb, html: bool = True) -> list[str]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif "data" in o:
                out.extend(v for k, v in o.data.items() if k.startswith("text/") and isinstance(v, str)
                           and (html or k != "text/html"))
    return out


def test_every_notebook_is_listed():
    assert set(NAMES) == set(TINY), "add tiny parameters for new notebooks to TINY"


# ---- the committed notebooks ---------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_structure(path):
    nb = _nb(path)
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size / 1024:.0f} KB"
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert tagged[0] == first_code, "the parameters cell must be the first code cell"
    params = papermill.inspect_notebook(str(path))
    assert params, "no parameters found"
    for name, p in params.items():
        assert p["help"].strip(), f"parameter {name} has no help comment"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert not re.search(r"^\s*[!%]?pip install|sys\.path", c.source, re.M), "no pip / sys.path cells"
        assert "print(model)" not in c.source
        assert c.execution_count is not None or not c.source.strip(), "every code cell is executed"
        for o in c.get("outputs", []):
            assert o.output_type != "error", f"{path.name} holds an error output"
    texts = _text_outputs(nb)
    assert any("all checks passed" in t for t in texts), "the assert cell ran and passed"
    for t in texts:
        assert len(t) < MAX_HTML_CHARS, f"a {len(t)}-character output"
        assert not MODEL_PRINTOUT.search(t), "a model printout in the outputs"
        assert "%|" not in t and "it/s]" not in t, "a progress bar in the outputs"
    for t in _text_outputs(nb, html=False):
        assert len(t) < MAX_TEXT_CHARS, f"a {len(t)}-character text output (model printout?)"


def _parameters(nb) -> dict:
    """The variables of the notebook's `parameters` cell, executed on its own (literals: no imports needed)."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    ns: dict = {"Optional": Optional}
    exec(compile(cell.source, "parameters", "exec"), ns)
    return {k: v for k, v in ns.items() if not k.startswith("__") and k != "Optional"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_parameters_cell_is_valid(path):
    """Every parameter is read by the notebook (by name, or as a config field through config_from_parameters),
    and the run notebooks' parameters make a valid CompressConfig, with their defaults and with TINY's values."""
    nb = _nb(path)
    params = _parameters(nb)
    assert set(params) == set(papermill.inspect_notebook(str(path))), "a variable papermill does not see"
    body = "\n".join(c.source for c in nb.cells if c.cell_type == "code"
                     and "parameters" not in c.metadata.get("tags", []))
    to_config = "config_from_parameters(globals()" in body
    fields = {f.name for c in (CompressConfig, *sections(CompressConfig).values()) for f in dataclasses.fields(c)}
    unused = [n for n in params if not re.search(rf"\b{n}\b", body) and not (to_config and n in fields)]
    assert not unused, f"{path.name}: parameters {unused} are never used"
    assert set(TINY[path.stem]) <= set(params), "TINY sets a parameter the notebook does not have"
    for values in (params, {**params, **TINY[path.stem]}):
        if to_config:
            cfg = config_from_parameters(values, values.get("overrides"), threads=values.get("threads") or None)
            assert cfg.dataset == values["dataset"] and cfg.run.progress is False
        for a in values.get("ablations", []):
            assert a in ABLATIONS, f"ablation {a!r} is not one of {sorted(ABLATIONS)}"
        for m in values.get("baselines", []):
            assert m in METHODS and m != "uvc", f"baseline {m!r} is not a one-shot method of {METHODS}"
        for b in values.get("budgets", []) + values.get("uvc_budgets", []) + values.get("bench_budgets", []):
            assert 0 < b <= 1


@pytest.mark.parametrize("yaml_path", sorted((NB_DIR / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_parameter_files_match_notebook_parameters(yaml_path):
    """papermill -f FILE injects every key: each must be a parameter of the run notebooks 02-04."""
    keys = set(yaml.safe_load(yaml_path.read_text()))
    names = {n: set(papermill.inspect_notebook(str(NB_DIR / f"{n}.ipynb"))) for n in PRODUCERS}
    unknown = keys - set.union(*names.values())
    assert not unknown, f"{yaml_path.name}: {sorted(unknown)} are parameters of none of {PRODUCERS}"
    config_keys = {f.name for f in dataclasses.fields(CompressConfig)}
    for n, ps in names.items():
        needed = (keys & config_keys) - ({"macs_ratio"} if n == "04_pruning_ratios" else set())  # 04: `budgets`
        assert needed <= ps, f"{n} lacks config parameters {sorted(needed - ps)}"


@pytest.mark.parametrize("yaml_path", sorted((NB_DIR / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_parameter_files_replace_every_short_run_default(yaml_path):
    """The notebooks' defaults cap steps and evaluation images and set short-run UVC overrides: a real-scale
    file that leaves one out would silently run a capped job."""
    keys = yaml.safe_load(yaml_path.read_text())
    for key in ("max_steps_per_epoch", "eval_max_samples", "test_max_samples", "overrides"):
        assert key in keys, f"{yaml_path.name} must set {key} (the notebooks' default is for short CPU runs)"
    assert keys["max_steps_per_epoch"] is None and keys["eval_max_samples"] is None
    assert not [k for k in keys["overrides"] if k.startswith("uvc.")], "the library's UVC settings, not short-run ones"
    assert keys["overrides"]["mixup"] == 0.8 and keys["overrides"]["amp"] == "bf16"  # the paper's recipe (issue 27)
    assert keys["test_max_samples"] is None


@pytest.mark.parametrize("name", PRODUCERS)
def test_short_run_overrides_are_the_librarys(name):
    """The run notebooks' default `overrides` are SHORT_RUN_UVC (what the benchmark uses), as dotted keys."""
    from uvclab.uvc import SHORT_RUN_UVC
    default = papermill.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))["overrides"]["default"]
    assert ast.literal_eval(default) == {f"uvc.{k}": v for k, v in SHORT_RUN_UVC.items()}


# ---- papermill, tiny parameters ------------------------------------------------------------------

@pytest.fixture(scope="session")
def nb_runs(tmp_path_factory):
    """Runs folder shared by the papermill tests, and the set of notebooks already executed into it."""
    return tmp_path_factory.mktemp("notebook_runs"), {}


def _execute(name: str, nb_runs) -> nbformat.NotebookNode:
    root, done = nb_runs
    if name not in done:
        out = root / "executed" / f"{name}.ipynb"
        out.parent.mkdir(exist_ok=True)
        parameters = dict(TINY[name])
        if "runs_root" in papermill.inspect_notebook(str(NB_DIR / f"{name}.ipynb")):
            parameters["runs_root"] = str(root / "runs")
        papermill.execute_notebook(str(NB_DIR / f"{name}.ipynb"), str(out), parameters=parameters,
                                   cwd=str(NB_DIR), kernel_name="python3", progress_bar=False)
        done[name] = _nb(out)
    return done[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_runs_with_tiny_parameters(name, nb_runs, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)      # the kernel draws inline figures, as in JupyterLab
    if name in ("06_results", "07_explorer", "08_compare_runs"):   # 08 reuses 04's UVC runs
        for producer in PRODUCERS:
            _execute(producer, nb_runs)
    nb = _execute(name, nb_runs)
    texts = _text_outputs(nb)
    assert any("all checks passed" in t for t in texts)
    if name in PRODUCERS:
        assert list((nb_runs[0] / "runs").glob(f"{name}/**/report.json")), "the notebook wrote no finished run"
    if name == "06_results":
        assert any(f"{sum(1 for _ in (nb_runs[0] / 'runs').glob('**/report.json'))} finished runs" in t for t in texts)
