"""End to end, in a real browser: JupyterLab (started here on 127.0.0.1) and headless Debian Chromium driven
by Playwright open a notebook that shows `uvclab.ui.widgets.explorer`, run all cells, move the budget slider
with the keyboard, and check that the headline numbers, the structure table and the mask figure follow.

The test makes three small real runs first (digits, a few seconds each: a UVC budget sweep and a magnitude
baseline, `tests/small_runs.py`) and points the lab at them ($UVCLAB_RUNS), so the real notebook's explorer
shows learned structures (not its "uniform structure (live, untrained)" fallback). With the real notebook it
then picks two runs in the Compare view's dropdowns and checks that the comparison, the per-class chart and
the flipped-examples gallery change to the new pair.

Needs `bash .ci/install-browser .venv` (Debian's chromium + the `playwright` driver from PyPI; `.ci/run` calls
it); skips, saying why, only where /usr/bin/chromium or the driver is missing. Run it alone with

    .venv/bin/pytest -m browser -s tests/test_browser.py

Screenshots (lab page and explorer, before and after the slider move; the Compare view before and after
the selection; `browser-failure.png` on a failure) go to test-artifacts/ at the repository root (gitignored).

Which notebook (UVCLAB_BROWSER_NOTEBOOK, default `auto`):
  real       a copy of notebooks/07_explorer.ipynb without its outputs (in a temp folder; the repository's
             file is never touched);
             fails if it is missing or does not show an explorer with a budget slider that can move.
  generated  a notebook written here: a DeiT-S-shaped model (12 blocks, 32x32 input) and
             `explorer(model=...)`, whose slider computes uniform structures live. Needs no runs.
  auto       `real` when notebooks/07_explorer.ipynb exists and shows a movable explorer within
             REAL_NOTEBOOK_S seconds without an error; otherwise `generated`, with a warning that says why.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import pytest

from browser_helpers import CHROMIUM, CHROMIUM_ARGS, Deadline, JupyterLab, browser_unavailable
from browser_compare import check_compare_view

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
REAL_NOTEBOOK = REPO / "notebooks" / "07_explorer.ipynb"
CHOICE = os.environ.get("UVCLAB_BROWSER_NOTEBOOK", "auto")
TIME_LIMIT_S = 240          # the whole test, server and browser start included (teardown adds < 25 s)
REAL_NOTEBOOK_S = 110       # how long `auto` gives the real notebook to show its explorer (and compare view)
GENERATED_NOTEBOOK_S = 75   # Run All of the generated notebook (kernel start + torch import + model)
MOVE_S = 30                 # one slider move until the summary and the figure have followed
VIEWPORT = {"width": 1400, "height": 1000}

GENERATED_CELLS = [
    ("markdown", "# Explorer (browser test)\nA DeiT-S-shaped ViT (12 blocks, 32x32 input, untrained); the budget "
                 "slider computes `uniform_structure(model, budget)` live."),
    ("code", "import torch\n\nimport uvclab\nfrom uvclab.ui.widgets import explorer\n\ntorch.manual_seed(0)\n"
             "model = uvclab.create_vit(\"deit_small_patch16_224\", img_size=32, patch_size=8, depth=12, "
             "num_classes=10).eval()"),
    ("code", "box = explorer(runs_root=\"no-runs-here\", model=model)   # no runs: live uniform structures\nbox"),
]

# In the page: the explorer is the innermost widget VBox around a summary HTML (the last one, if several; a
# static `render_run` output of the same class outside any widget does not count). 'ready' needs Run All to
# be over: an idle kernel and no cell waiting ('[*]').
JS_STATE = """() => {
  const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden'));
  if (!panel) return {state: 'no notebook panel'};
  const errors = [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(e => e.innerText).filter(t => /Traceback|^\\w*(Error|Exception)\\b/m.test(t));
  const pending = [...panel.querySelectorAll('.jp-InputArea-prompt')].filter(e => e.innerText.includes('*')).length;
  const status = [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(e => e.innerText)
      .find(t => / \\| /.test(t)) || '';
  const sums = panel.querySelectorAll('.widget-vbox .uvclab-summary');
  const sum = sums[sums.length - 1];
  const box = sum && sum.closest('.widget-vbox');
  const img = box && box.querySelector('.widget-output img');
  const handle = box && box.querySelector('.widget-slider .noUi-handle, .widget-hslider .noUi-handle');
  const readout = box && box.querySelector('.widget-readout');
  if (box && !box.hasAttribute('data-uvclab-explorer')) {
    document.querySelectorAll('[data-uvclab-explorer]').forEach(e => e.removeAttribute('data-uvclab-explorer'));
    box.setAttribute('data-uvclab-explorer', '1');
  }
  const done = pending === 0 && status.endsWith('| Idle');
  return {state: errors.length ? 'error' : (box && img && handle && done ? 'ready' : 'waiting'), errors,
          kernel: status, pending, summary: sum ? sum.innerText : null, img: img ? img.getAttribute('src') : null,
          readout: readout ? readout.innerText.trim() : null,
          now: handle ? handle.getAttribute('aria-valuenow') : null,
          min: handle ? handle.getAttribute('aria-valuemin') : null,
          max: handle ? handle.getAttribute('aria-valuemax') : null};
}"""


class NotUsable(Exception):
    """The notebook ran but shows no usable explorer (an error, a timeout, a slider that cannot move)."""


def write_generated(folder: Path) -> Path:
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                for kind, src in GENERATED_CELLS]
    path = folder / "explorer_generated.ipynb"
    nbformat.write(nb, path)
    return path


def copy_without_outputs(src: Path, folder: Path) -> Path:
    """A copy of a notebook with no outputs and no saved widget state: only what Run All shows here counts."""
    import nbformat
    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    path = folder / src.name
    nbformat.write(nb, path)
    return path


def number(summary: str, label: str) -> float | None:
    """The headline number above `label` in the summary's text ('0.500\\nMACs ratio' -> 0.5); the label may go on
    with its test size ('top-1 %, 10,000 test images')."""
    m = re.search(r"([-+]?\d+(?:\.\d+)?)\s*\n\s*" + re.escape(label) + r"(?:,[^\n]*)?\s*\n", summary + "\n")
    return float(m.group(1)) if m else None


class Session:
    """One Chromium page on the lab; `log` keeps timestamped steps for the failure message."""

    def __init__(self, page, lab: JupyterLab, deadline: Deadline):
        self.page, self.lab, self.deadline, self.t0, self.steps = page, lab, deadline, time.monotonic(), []

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {msg}"
        self.steps.append(line)
        print(line, flush=True)

    def state(self) -> dict:
        return self.page.evaluate(JS_STATE)

    def wait_state(self, ok, what: str, cap: float) -> dict:
        """Poll the page until `ok(state)`; NotUsable on an error output or after `cap` seconds."""
        end = time.monotonic() + self.deadline.left(cap)
        st = {}
        while time.monotonic() < end:
            st = self.state()
            if st["state"] == "error":
                raise NotUsable(f"an error output appeared while waiting for {what}:\n" + "\n".join(st["errors"])[-2000:])
            if ok(st):
                return st
            self.page.wait_for_timeout(300)
        raise NotUsable(f"no {what} within {cap:.0f} s (kernel: {st.get('kernel')!r}, "
                        f"summary: {(st.get('summary') or '')[:200]!r})")

    def open_and_run_all(self, name: str, workspace: str, cap: float) -> dict:
        self.page.goto(self.lab.url(f"lab/workspaces/{workspace}/tree/{name}"), timeout=self.deadline.ms(60))
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=self.deadline.ms(60))
        self.log(f"JupyterLab shows {name}")
        self.wait_state(lambda s: s["kernel"].endswith("| Idle"), "idle kernel", 60)
        self.log("kernel idle; Run > Run All Cells")
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click(timeout=self.deadline.ms(15))
        self.page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click(timeout=self.deadline.ms(15))
        st = self.wait_state(lambda s: s["state"] == "ready", "explorer (summary, slider and figure)", cap)
        self.log(f"explorer shown: slider {st['readout']!r}, MACs ratio {number(st['summary'], 'MACs ratio')}")
        return st

    def screenshots(self, tag: str) -> list[Path]:
        ARTIFACTS.mkdir(exist_ok=True)
        box = self.page.locator("[data-uvclab-explorer]")
        box.scroll_into_view_if_needed(timeout=self.deadline.ms(10))
        lab_png, box_png = ARTIFACTS / f"browser-lab-{tag}.png", ARTIFACTS / f"browser-explorer-{tag}.png"
        self.page.screenshot(path=str(lab_png), timeout=self.deadline.ms(20))
        box.screenshot(path=str(box_png), timeout=self.deadline.ms(20))
        self.log(f"screenshots: {lab_png.relative_to(REPO)}, {box_png.relative_to(REPO)}")
        return [lab_png, box_png]

    def move_slider(self, before: dict, presses: int = 4) -> tuple[dict, int]:
        """Focus the slider handle and press an arrow key (right, or left at the top end) up to `presses` times,
        stopping at the end of the slider; wait until the summary and the figure have changed and the budget
        card agrees with the slider's readout. Returns the state after and the direction (+1 or -1)."""
        now, lo, hi = (float(before[k]) for k in ("now", "min", "max"))
        if hi - lo < 1e-9:
            raise NotUsable("the budget slider has a single position: nothing to move")
        key, direction = ("ArrowRight", 1) if now < hi - 1e-9 else ("ArrowLeft", -1)
        handle = self.page.locator("[data-uvclab-explorer] .noUi-handle").first
        handle.focus(timeout=self.deadline.ms(10))
        pressed = 0
        for _ in range(presses):
            handle.press(key, timeout=self.deadline.ms(10))
            pressed += 1
            self.page.wait_for_timeout(150)
            v = float(handle.get_attribute("aria-valuenow", timeout=self.deadline.ms(10)))
            if v in (lo, hi):
                break
        self.log(f"pressed {key} x{pressed} on the slider handle")

        def followed(s):
            budget = number(s["summary"] or "", "budget")
            return (s["state"] == "ready" and s["readout"] != before["readout"] and s["summary"] != before["summary"]
                    and s["img"] != before["img"] and budget is not None
                    and s["readout"].startswith(f"{budget:.2f}"))
        end = time.monotonic() + self.deadline.left(MOVE_S)
        while True:                                      # settled: the same for 1 s (no queued render left)
            after = self.wait_state(followed, "summary and figure following the slider", end - time.monotonic())
            self.page.wait_for_timeout(1000)
            again = self.state()
            if (again["summary"], again["img"], again["readout"]) == (after["summary"], after["img"], after["readout"]):
                break
        self.log(f"slider {before['readout']!r} -> {after['readout']!r}")
        return after, direction


def check_followed(before: dict, after: dict, direction: int) -> str:
    """The summary, its numbers and the figure after the slider moved by `direction` (+1 right, -1 left).

    Always: the budget card shows the slider's value (checked while waiting), the summary and the figure
    changed, MACs ratio <= budget. A new budget (slider options are in budget order) moved the way the slider
    did and shows a new MACs ratio; several runs at one budget (labels '0.50 (name)') show another run's title.
    Live uniform structures (title '... (live, untrained)'): the MACs ratio and the table follow the budget.
    """
    m0, m1 = number(before["summary"], "MACs ratio"), number(after["summary"], "MACs ratio")
    b0, b1 = number(before["summary"], "budget"), number(after["summary"], "budget")
    assert None not in (m0, m1, b0, b1), f"no MACs ratio / budget card in the summary:\n{after['summary']}"
    assert after["summary"] != before["summary"], "the summary did not change"
    assert after["img"].startswith("data:image/png;base64,") and after["img"] != before["img"], \
        "the mask figure did not change"
    assert m0 <= b0 + 1e-3 and m1 <= b1 + 1e-3, f"MACs ratio above the budget: {m0} > {b0} or {m1} > {b1}"
    title0, title1 = (s["summary"].split("\n", 1)[0] for s in (before, after))
    if b1 != b0:
        assert (b1 - b0) * direction > 0, f"budget card {b0} -> {b1} after moving the slider {direction:+d}"
        assert m1 != m0, f"budget {b0} -> {b1} but the MACs ratio stayed {m0}"
    else:
        assert title1 != title0, f"the slider moved between runs of budget {b0} but the title stayed {title0!r}"
    if "(live" in title1:
        table0, table1 = (s["summary"].split("blocks kept", 1)[-1] for s in (before, after))
        assert (m1 - m0) * direction > 0, f"MACs ratio {m0} -> {m1} while the budget went {b0} -> {b1}"
        assert "mlp" in table1 and table1 != table0, "the structure summary table did not change"
    return f"budget {b0} -> {b1}, MACs ratio {m0} -> {m1}, summary and figure changed"


@pytest.fixture
def real_runs(tmp_path, monkeypatch):
    """Small real runs where the notebooks look for them ($UVCLAB_RUNS/notebooks); the lab and its kernels
    inherit UVCLAB_RUNS. Returns the run folders by name."""
    if browser_unavailable():
        return {}
    from small_runs import make_small_runs
    monkeypatch.setenv("UVCLAB_RUNS", str(tmp_path / "runs"))
    return make_small_runs(tmp_path / "runs" / "notebooks")


def check_learned(state: dict, runs: dict) -> str:
    """The explorer shows one of the real runs: its folder name in the title, an accuracy card, no fallback."""
    title = next(line for line in state["summary"].splitlines() if line.strip()).strip()
    assert "(live, untrained)" not in state["summary"], f"the explorer shows its fallback: {title!r}"
    names = {Path(p).name for p in runs.values()}
    assert title.split(":", 1)[0] in names, f"title {title!r} names none of the runs {sorted(names)}"
    assert number(state["summary"], "top-1 %") is not None, "no accuracy card: not a finished run"
    return title


def test_explorer_in_jupyterlab(tmp_path, real_runs):
    why = browser_unavailable()
    if why:
        pytest.skip(f"no browser: {why}")
    if CHOICE not in ("auto", "real", "generated"):
        pytest.fail(f"UVCLAB_BROWSER_NOTEBOOK={CHOICE!r}: use auto, real or generated")
    if CHOICE == "real" and not REAL_NOTEBOOK.exists():
        pytest.fail(f"UVCLAB_BROWSER_NOTEBOOK=real but {REAL_NOTEBOOK.relative_to(REPO)} does not exist")
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    deadline = Deadline(TIME_LIMIT_S)
    root, home = tmp_path / "notebooks", tmp_path / "jupyter-home"
    root.mkdir()
    home.mkdir()
    generated = write_generated(root)
    real = None
    if CHOICE != "generated" and REAL_NOTEBOOK.exists():
        real = copy_without_outputs(REAL_NOTEBOOK, root)
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("browser-*"):          # no screenshot of an earlier run may pass for this one's
        old.unlink()

    lab = JupyterLab(root, home, ARTIFACTS / "browser-jupyterlab.log")
    session = None
    try:
        lab.start(deadline, timeout=60)
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
                args=CHROMIUM_ARGS, viewport=VIEWPORT, timeout=deadline.ms(60))
            page = None
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.set_default_timeout(30_000)
                session = Session(page, lab, deadline)
                session.log(f"jupyter lab on {lab.base}; chromium started")

                used, before = None, None
                if real is not None:
                    try:
                        before = session.open_and_run_all(real.name, "real", REAL_NOTEBOOK_S)
                        if float(before["max"]) - float(before["min"]) < 1e-9:
                            raise NotUsable("its budget slider has a single position: nothing to move")
                        used = "real"
                    except (NotUsable, PlaywrightError) as e:
                        if CHOICE == "real":
                            raise
                        msg = (f"notebooks/07_explorer.ipynb shows no usable explorer here ({e}); "
                               "the browser test uses its generated notebook instead")
                        session.log(msg)
                        warnings.warn(msg)
                        lab.shutdown_kernels()
                if used is None:
                    before = session.open_and_run_all(generated.name, "generated", GENERATED_NOTEBOOK_S)
                    used = "generated"
                session.log(f"notebook used: {used}")

                if used == "real":
                    session.log(f"structure view shows a learned run: {check_learned(before, real_runs)!r}")
                session.screenshots("before")
                after, direction = session.move_slider(before)
                session.screenshots("after")

                verdict = check_followed(before, after, direction)
                session.log(f"OK ({used} notebook): {verdict}")
                if used == "real":
                    session.log(f"OK (compare view): {check_compare_view(session, real_runs, ARTIFACTS, MOVE_S)}")
            except BaseException:
                try:
                    if page is not None:
                        page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), timeout=10_000)
                except Exception:  # noqa: BLE001 - the failure itself is what matters
                    pass
                raise
            finally:
                ctx.close()
    except (NotUsable, TimeoutError, PlaywrightError, RuntimeError) as e:
        steps = "\n".join(session.steps) if session else ""
        pytest.fail(f"{type(e).__name__}: {e}\n\nsteps:\n{steps}\n\njupyter lab log (tail):\n{lab.log_tail()}\n"
                    f"screenshot: test-artifacts/browser-failure.png", pytrace=False)
    finally:
        lab.stop()
