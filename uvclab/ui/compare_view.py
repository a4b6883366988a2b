"""The Compare view of the explorer (ipywidgets): pick two runs (or one and the teacher) and see what changed.

Top: the accuracy-vs-MACs scatter of every run under the runs folder, the two selected ringed A and B. Then
the headline numbers (top-1 of each, agreement, mean KL, flipped counts), the per-class accuracy change, a
gallery of flipped test images with both predictions (right -> wrong or wrong -> right), and the per-block
structure difference. Predictions come from `uvclab.compare.behaviour.compare_runs`, cached in the run
folders, so moving between dozens of runs costs a model evaluation only the first time a run is shown.
`render_comparison` is the pure function behind it (HTML + figures), testable without a browser;
`workbench` puts this view next to the structure explorer in tabs.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

import ipywidgets as W
import matplotlib.pyplot as plt

from uvclab.compare.behaviour import Comparison, compare_runs
from uvclab.compare.predictions import TEACHER
from uvclab.compare.runs import read_runs
from uvclab.errors import UvclabError
from uvclab.paths import runs_dir
from uvclab.ui import compare_figures as cf
from uvclab.ui.widgets import _BUSY, _CARD, _png_output, explorer

KINDS = {"right \u2192 wrong": "right_to_wrong", "wrong \u2192 right": "wrong_to_right"}


def full_test_size(dataset: str) -> Optional[int]:
    """Images in the whole test split of `dataset`, from its reference teacher card (None without one)."""
    import json
    from uvclab.paths import default_teacher
    try:
        card = json.loads(default_teacher(dataset).read_text())
    except (OSError, ValueError, UvclabError):
        return None
    return (card.get("split_sizes") or {}).get("test")


def run_options(runs, root: Path, compared_on: Optional[int] = None) -> list[tuple[str, str]]:
    """Dropdown options: ('teacher', 'teacher') then one (label, path) per run, the label naming the folder
    (relative to root), the model as built, method and budget, and the report's top-1 with its test size only
    where the report was measured on `compared_on` images (the images the Compare view evaluates): a run
    keeps one accuracy in the view; one measured on fewer says so and gets its accuracy from the cards."""
    opts = [("teacher (of the other run)", TEACHER)]
    for r in runs.itertuples():
        try:
            rel = Path(r.path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = Path(r.path).name
        n = getattr(r, "test_samples", None)
        n = int(n) if n is not None and n == n else None
        acc = (f"{r.top1:.2f} % ({n:,} test images)" if n is not None and (compared_on is None or n == compared_on)
               else f"report on {n:,} test images only" if n is not None else f"{r.top1:.2f} % (test size unknown)")
        model = getattr(r, "model", None) or r.model_name
        opts.append((f"{rel}  \u00b7  {model}  \u00b7  {r.method} B={r.budget:g}  \u00b7  {acc}", r.path))
    return opts


def comparison_html(c: Comparison) -> str:
    """Headline cards of a comparison."""
    n = f"{len(c.labels):,} test images"
    cards = [(f"{c.top1_a:.2f}", f"A top-1 % ({c.a.label}), {n}"), (f"{c.top1_b:.2f}", f"B top-1 % ({c.b.label}), {n}"),
             (f"{100 * c.agreement:.1f}", "agreement %"), (f"{c.mean_kl:.3f}", "mean KL(A\u2016B), nats"),
             (str(len(c.right_to_wrong)), "right \u2192 wrong"), (str(len(c.wrong_to_right)), "wrong \u2192 right")]
    worst = c.per_class["delta"].idxmin()
    return ('<div class="uvclab-compare-summary">'
            + "".join(_CARD.format(value=v, label=html.escape(k)) for v, k in cards)
            + f'<div style="font-size:12px;color:#444">{len(c.labels):,} test images; the class B loses most on: '
            f"<b>{html.escape(str(worst))}</b> ({c.per_class.loc[worst, 'delta']:+.1f} points)</div></div>")


def render_comparison(a, b, kind: str = "right_to_wrong", max_samples: Optional[int] = None,
                      comparison: Optional[Comparison] = None, gallery_size: int = 12) -> tuple[str, dict]:
    """(summary HTML, {'classes', 'gallery', 'structure': Figure}) of compare_runs(a, b)."""
    c = comparison or compare_runs(a, b, max_samples=max_samples)
    figs = {"classes": cf.plot_class_delta(c), "gallery": cf.plot_flipped_gallery(c, kind, gallery_size),
            "structure": cf.plot_structure_diff(c.structure_diff, c.a.label, c.b.label)}
    return comparison_html(c), figs


def _show(out: W.Output, fig) -> None:
    try:
        out.outputs = (_png_output(fig, "<figure>"),)
    finally:
        plt.close(fig)


def compare_view(runs_root: str | Path | None = None, a=None, b=None, max_samples: Optional[int] = None,
                 gallery_size: int = 12) -> W.VBox:
    """A VBox: two run dropdowns (A, B), the scatter, headline numbers, per-class chart, flipped gallery of up
    to `gallery_size` images (toggle: right -> wrong / wrong -> right), structure difference.
    Defaults: A = teacher, B = the first run.
    Inner widgets are attributes: `run_a`, `run_b`, `kind`, `scatter_out`, `summary_html`, `class_out`,
    `gallery_out`, `structure_out`; `box.comparison` is the current `Comparison` (None after an error)."""
    root = Path(runs_root or runs_dir())
    runs = read_runs(root)
    if not len(runs):
        raise UvclabError(f"No finished runs under '{root}' to compare. Run `uvclab compress` (or notebooks "
                          "02-04) first, or point runs_root at a runs folder.")
    full = full_test_size(str(runs["dataset"].iloc[0])) if runs["dataset"].nunique() == 1 else None
    options = run_options(runs, root, max_samples or full)
    layout = W.Layout(width="760px")
    run_a = W.Dropdown(options=options, value=a or TEACHER, description="A", layout=layout)
    run_b = W.Dropdown(options=options, value=b or options[1][1], description="B", layout=layout)
    kind = W.ToggleButtons(options=list(KINDS), value=list(KINDS)[0], description="flipped")
    scatter_out, class_out, gallery_out, structure_out = W.Output(), W.Output(), W.Output(), W.Output()
    summary_html = W.HTML()
    for w, cls in ((run_a, "uvclab-compare-a"), (run_b, "uvclab-compare-b"), (kind, "uvclab-compare-kind"),
                   (class_out, "uvclab-compare-classes"), (gallery_out, "uvclab-compare-gallery"),
                   (structure_out, "uvclab-compare-structure"), (scatter_out, "uvclab-compare-scatter")):
        w.add_class(cls)
    teacher_top1 = float(runs["teacher_top1"].iloc[0]) if runs["dataset"].nunique() == 1 else None
    box = W.VBox()
    box.comparison = None

    def update(change=None) -> None:
        if change is not None and change["owner"] is kind:        # same pair: only the gallery changes
            if box.comparison is not None:
                _show(gallery_out, cf.plot_flipped_gallery(box.comparison, KINDS[kind.value], gallery_size))
            return
        summary_html.value = _BUSY.replace("uvclab-summary", "uvclab-compare-summary")
        try:
            box.comparison = compare_runs(run_a.value, run_b.value, max_samples=max_samples)
            c = box.comparison        # A and B drawn at the accuracy the cards show (one accuracy per run)
            _show(scatter_out, cf.plot_runs_scatter(runs, run_a.value, run_b.value, teacher_top1,
                                                    {str(run_a.value): c.top1_a, str(run_b.value): c.top1_b},
                                                    len(c.labels)))
            text, figs = render_comparison(None, None, KINDS[kind.value], comparison=box.comparison,
                                           gallery_size=gallery_size)
        except (UvclabError, OSError) as e:
            box.comparison = None
            _show(scatter_out, cf.plot_runs_scatter(runs, run_a.value, run_b.value, teacher_top1))
            summary_html.value = (f'<div class="uvclab-compare-summary" style="color:#b00">Cannot compare: '
                                  f"{html.escape(str(e))}</div>")
            class_out.outputs = gallery_out.outputs = structure_out.outputs = ()
            return
        for out, key in ((class_out, "classes"), (gallery_out, "gallery"), (structure_out, "structure")):
            _show(out, figs[key])
        summary_html.value = text

    for w in (run_a, run_b, kind):
        w.observe(update, names="value")
    update()
    box.children = [W.VBox([run_a, run_b]), W.HBox([scatter_out, class_out]), summary_html, kind, gallery_out,
                    structure_out]
    box.add_class("uvclab-compare")
    box.run_a, box.run_b, box.kind, box.summary_html = run_a, run_b, kind, summary_html
    box.scatter_out, box.class_out, box.gallery_out, box.structure_out = scatter_out, class_out, gallery_out, structure_out
    return box


def workbench(runs_root: str | Path | None = None, model=None) -> W.Tab:
    """The structure explorer and the Compare view side by side, as two tabs ('Structure', 'Compare')."""
    tabs = [explorer(runs_root, model=model)]
    if len(read_runs(runs_root or runs_dir())):
        tabs.append(compare_view(runs_root))
    tab = W.Tab(children=tabs)
    for i, title in enumerate(["Structure", "Compare"][:len(tabs)]):
        tab.set_title(i, title)
    return tab
