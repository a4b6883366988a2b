"""An ipywidgets explorer of compressed structures: pick a run family and move a budget slider.

Runs written by `uvclab compress` are grouped into families by dataset + model (as built, e.g. 'ViT 12x96,
patch 7, 28 px': `uvclab.compare.runs.model_label`) + parent folder (a budget sweep, an ablation folder); the slider steps over the budgets of the family and shows the run's headline numbers, its `Structure.summary()` table and `plot_masks`.
Without runs, pass `model=` to explore `uniform_structure(model, budget)` live. The rendering is the pure
function `render_run` / `render_structure` (HTML string + Figure), so tests need no browser.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import ipywidgets as W
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from uvclab.vit.macs import count, vit_shape
from uvclab.errors import UvclabError
from uvclab.paths import STRUCTURE, runs_dir
from uvclab.vit.structure import Structure
from uvclab.compare.runs import model_label, read_report, read_runs
from uvclab.ui.viz import plot_masks

_CARD = ('<div style="display:inline-block;margin:0 22px 6px 0">'
         '<div style="font-size:26px;font-weight:600;line-height:1.1">{value}</div>'
         '<div style="font-size:12px;color:#666">{label}</div></div>')
_CELL = 'style="padding:1px 8px;line-height:1.25;text-align:{align};border:0;{extra}"'
_BUSY = '<div class="uvclab-summary" style="color:#666;font-style:italic">computing\u2026</div>'


def _fmt_n(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def _summary_table(structure: Structure) -> str:
    """Per-block table with proportions ("2/3", "172/768 (22 %)"), compact rows (inline styles, so no
    notebook stylesheet makes them tall)."""
    H, Dh, M = structure.num_heads, structure.head_dim, structure.mlp_hidden
    heads = ["#", "block", "attention", "MLP", "heads kept", "q/k dims per head", "v dims per head",
             "MLP neurons kept"]
    yes, no = "\u2713", '<span style="color:#b00">\u2717</span>'
    rows = []
    for l, blk in enumerate(structure.blocks):
        nh = max(len(blk.heads), 1)
        if blk.runs_attn:
            att = [f"{len(blk.heads)}/{H}", f"{_fmt_n(sum(map(len, blk.qk_dims)) / nh)}/{Dh}",
                   f"{_fmt_n(sum(map(len, blk.v_dims)) / nh)}/{Dh}"]
        else:
            att = ["\u2013"] * 3
        mlp = f"{len(blk.mlp)}/{M} ({100 * len(blk.mlp) / M:.0f} %)" if blk.runs_mlp else "\u2013"
        flags = [yes if f else no for f in (blk.keep, blk.runs_attn, blk.runs_mlp)]
        rows.append([str(l)] + flags + att + [mlp])
    align = ["right", "center", "center", "center", "right", "right", "right", "right"]
    th = "".join(f'<th {_CELL.format(align=al, extra="font-weight:600;border-bottom:1px solid #bbb")}>{h}</th>'
                 for h, al in zip(heads, align))
    body = "".join("<tr>" + "".join(f'<td {_CELL.format(align=al, extra="")}>{c}</td>' for c, al in zip(r, align))
                   + "</tr>" for r in rows)
    return (f'<table style="border-collapse:collapse;font-size:12px;margin:2px 0">'
            f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
            '<div style="font-size:11px;color:#666">\u2713 runs, \u2717 skipped (whole block, attention or mlp '
            "branch); dims per head are means over the kept heads</div>")


def render_structure(structure: Structure, numbers: dict, title: str = "") -> tuple[str, Figure]:
    """HTML (headline numbers in large type + per-block summary table) and the mask figure.

    `numbers` may hold macs_ratio, budget, params_ratio, top1, teacher_top1 (percent), blocks_kept,
    test_samples (the accuracy cards name it); missing ones (None) get no card.
    """
    n = numbers
    blocks = n.get("blocks_kept", sum(b.keep for b in structure.blocks))
    on = f", {n['test_samples']:,} test images" if n.get("test_samples") else ""
    cards = [("MACs ratio", n.get("macs_ratio"), ".3f"), ("budget", n.get("budget"), ".2f"),
             ("params ratio", n.get("params_ratio"), ".3f"), (f"top-1 %{on}", n.get("top1"), ".2f"),
             (f"teacher top-1 %{on}", n.get("teacher_top1"), ".2f")]
    cards = [(k, format(v, spec)) for k, v, spec in cards if v is not None]
    cards.append(("blocks kept", f"{blocks} / {structure.depth}"))
    head = f'<div style="font-size:14px;margin-bottom:4px"><b>{html.escape(title)}</b></div>' if title else ""
    out = (f'<div class="uvclab-summary">{head}<div>'
           + "".join(_CARD.format(value=v, label=k) for k, v in cards)
           + f"</div><div>{_summary_table(structure)}</div></div>")
    return out, plot_masks(structure)


def render_run(run_dir: str | Path) -> tuple[str, Figure]:
    """(HTML, mask Figure) of one finished run folder (report.json + structure.json)."""
    run_dir = Path(run_dir)
    rep = read_report(run_dir)
    structure = Structure.load(run_dir / STRUCTURE)
    model = model_label((rep.get("model") or {}).get("name"), (rep.get("model") or {}).get("kwargs"))
    title = f"{run_dir.name}: {model} on {rep.get('dataset', '?')}"
    return render_structure(structure, rep, title)


def render_uniform(model, macs_ratio: float) -> tuple[str, Figure]:
    """(HTML, mask Figure) of `uniform_structure(model, macs_ratio)`, computed now (no accuracy)."""
    from uvclab.prune.baselines import uniform_structure
    st = uniform_structure(model, macs_ratio)
    shape = vit_shape(model)
    dense, mine = count(shape), count(shape, st)
    numbers = dict(macs_ratio=mine["macs"] / dense["macs"], budget=macs_ratio,
                   params_ratio=mine["params"] / dense["params"])
    return render_structure(st, numbers, f"uniform structure at budget {macs_ratio:.2f} (live, untrained)")


def _png_output(fig: Figure, text: str = "<mask figure>") -> dict:
    """A display_data output of the figure as a 256-colour PNG (saved notebooks keep widget state: small)."""
    from uvclab.ui.viz import compact_png
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(compact_png(fig)).decode(), "text/plain": text}}


def _families(runs, root: Path) -> dict[str, list[tuple[str, str]]]:
    """Family label -> [(slider label, run path)] in budget order. A family is dataset + model as built + the run's
    parent folder (a budget sweep and an ablation folder are different families); several runs at one budget
    in a family get the folder name in their slider label."""
    runs = runs.copy()
    rel = []
    for p in runs["path"]:
        try:
            rel.append(Path(p).parent.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            rel.append(Path(p).parent.name)
    runs["folder"] = rel
    fam: dict[str, list[tuple[str, str]]] = {}
    if "model" not in runs:
        runs["model"] = [model_label(n, k) for n, k in zip(runs["model_name"], runs["model_kwargs"])]
    for (ds, name, folder), g in runs.groupby(["dataset", "model", "folder"], sort=True):
        g = g.sort_values(["budget", "name"])
        labels = [f"{b:.2f}" for b in g["budget"]]
        dup = {lb for lb in labels if labels.count(lb) > 1}
        key = f"{ds} / {name}" + ("" if folder == "." else f"  \u00b7  {folder}")
        fam[key] = [(lb + (f" ({r})" if lb in dup else ""), p) for lb, r, p in zip(labels, g["name"], g["path"])]
    return fam


def explorer(runs_root: str | Path | None = None, model=None) -> W.VBox:
    """A VBox: family dropdown, budget slider, headline numbers + summary table, mask figure.

    `runs_root` defaults to `paths.runs_dir()` ($UVCLAB_RUNS or ./runs). Inner widgets are attributes of the box (and in `box.widgets`): `dropdown`, `slider`, `summary_html`,
    `figure_out`. Moving `box.slider.value` re-renders synchronously.
    """
    runs = read_runs(runs_root)
    summary_html = W.HTML()
    figure_out = W.Output()

    def show(render, *args) -> None:
        summary_html.value = _BUSY                            # busy cue while the structure and figure render
        try:
            text, fig = render(*args)
        except (UvclabError, OSError, KeyError, ValueError) as e:
            summary_html.value = f'<div style="color:#b00">Cannot show this: {html.escape(str(e))}</div>'
            figure_out.outputs = ()
            return
        summary_html.value = text
        try:
            figure_out.outputs = (_png_output(fig),)
        finally:
            plt.close(fig)

    if len(runs):
        families = _families(runs, Path(runs_root or runs_dir()))
        # start on the family with the most distinct budgets (a sweep), so the slider has somewhere to go
        start = max(families, key=lambda k: len({lb.split(" ")[0] for lb, _ in families[k]}))
        dropdown = W.Dropdown(options=list(families), value=start, description="runs",
                              layout=W.Layout(width="600px"))
        slider = W.SelectionSlider(options=families[dropdown.value], description="budget",
                                   continuous_update=False, layout=W.Layout(width="420px"))

        shown = [None]

        def show_run(path) -> None:
            if path != shown[0]:                          # a family change may also move the slider
                shown[0] = path
                show(render_run, path)

        def on_family(change) -> None:
            slider.options = families[change["new"]]      # resets the value to the family's first budget
            show_run(slider.value)

        dropdown.observe(on_family, names="value")
        slider.observe(lambda c: show_run(c["new"]), names="value")
        show_run(slider.value)
    elif model is not None:
        dropdown = W.Dropdown(options=["uniform structure (live)"], value="uniform structure (live)",
                              description="source", disabled=True, layout=W.Layout(width="340px"))
        slider = W.FloatSlider(value=0.5, min=0.1, max=1.0, step=0.05, description="budget", readout_format=".2f",
                               continuous_update=False, layout=W.Layout(width="420px"))
        slider.observe(lambda c: show(render_uniform, model, c["new"]), names="value")
        show(render_uniform, model, slider.value)
    else:
        where = runs_root or runs_dir()
        raise UvclabError(f"No finished runs under '{where}'. Run `uvclab compress` first, point runs_root at "
                          "a runs folder, or pass model= to explore uniform structures live.")

    box = W.VBox([W.HBox([dropdown, slider]), summary_html, figure_out])
    box.widgets = dict(dropdown=dropdown, slider=slider, summary_html=summary_html, figure_out=figure_out)
    box.dropdown, box.slider, box.summary_html, box.figure_out = dropdown, slider, summary_html, figure_out
    return box
