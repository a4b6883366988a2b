"""Figures and the explorer widget on fake run folders (same file formats as `uvclab compress` writes)."""
import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from conftest import random_structure, small_vit  # noqa: E402
from uvclab import UvclabError  # noqa: E402
from uvclab.compare import runs as run_files  # noqa: E402
from uvclab.ui import pareto, viz  # noqa: E402
from uvclab.prune.baselines import uniform_structure  # noqa: E402
from uvclab.vit.macs import count  # noqa: E402
from uvclab.vit.structure import Structure  # noqa: E402
from uvclab.ui.widgets import explorer, render_run  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests do tiny tensor ops; one intra-op thread avoids spin contention on a busy 2-core CPU
    (uniform_structure goes from ~10 s to ~0.5 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def fake_metrics(structure: Structure, budget: float, steps: int = 40, warmup: int = 8, steps_per_epoch: int = 8):
    """Search records that shrink from dense towards `budget`, then epoch and fine-tune records."""
    L, H, Dh, M = structure.depth, structure.num_heads, structure.head_dim, structure.mlp_hidden
    recs = []
    for step in range(steps):
        t = max(0.0, (step - warmup) / (steps - warmup))          # 0 during warm-up, then -> 1
        recs.append(dict(stage="search", step=step, epoch=step // steps_per_epoch, warmup=step < warmup,
                         expected_macs_ratio=1 - (1 - budget) * t ** 0.5, budget=budget, z=0.5 * t * math.exp(-2 * t),
                         heads_removed=[math.ceil(t * l / L * H / 2) for l in range(L)],
                         neurons_removed=[math.ceil(t * (l + 1) / L * M / 2) for l in range(L)],
                         dims_removed=[[math.ceil(t * h / H * Dh / 2) for h in range(H)] for _ in range(L)],
                         keep_prob=[1 - 0.8 * t * (l == 1) for l in range(L)],
                         y_heads=[0.0] * L, y_neurons=[0.0] * L, p_mean=[0.0] * L, loss=2 - t, lr=1e-3))
        if step % steps_per_epoch == steps_per_epoch - 1:
            recs.append(dict(stage="search_epoch", epoch=step // steps_per_epoch, val_top1_hard=50 + 30 * t,
                             expected_macs_ratio=recs[-1]["expected_macs_ratio"], z=recs[-1]["z"],
                             structure_macs_ratio=recs[-1]["expected_macs_ratio"] - 0.02))
    recs.append(dict(stage="finetune_epoch", epoch=-1, val_top1=70.0))
    for e in range(3):
        recs.append(dict(stage="finetune_epoch", epoch=e, loss=1.0 / (e + 1), val_top1=75.0 + e,
                         best_val_top1=75.0 + e))
    return recs


def write_run(folder, model, structure: Structure, budget: float, dataset="digits", top1=80.0, teacher=90.0):
    """A run folder as `uvclab compress` leaves it: config.yaml, structure.json, report.json, metrics.jsonl."""
    folder.mkdir(parents=True)
    dense, mine = count(model), count(model, structure)
    (folder / "config.yaml").write_text(f"dataset: {dataset}\nmacs_ratio: {budget}\n")
    structure.save(folder / "structure.json")
    report = dict(uvclab_version="0.2.0", method="uvc", model=model.uvclab_config, dataset=dataset,
                  teacher_top1=teacher, top1=top1, val_top1=top1 + 1, val_top1_before_finetune=top1 - 10, budget=budget,
                  macs=mine["macs"], dense_macs=dense["macs"], macs_ratio=mine["macs"] / dense["macs"],
                  params=mine["params"], dense_params=dense["params"],
                  params_ratio=mine["params"] / dense["params"], blocks_kept=sum(b.keep for b in structure.blocks),
                  depth=structure.depth, layout="fused", seconds=12.5)
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_metrics(structure, budget)))
    return report


@pytest.fixture(scope="module")
def model():
    return small_vit()


@pytest.fixture
def runs(tmp_path, model):
    """runs/: two budgets of one family (digits / deit_small) and one run of another dataset."""
    root = tmp_path / "runs"
    reports = {}
    for name, budget, seed in [("uvc_050", 0.5, 1), ("uvc_070", 0.7, 2)]:
        reports[name] = write_run(root / name, model, random_structure(model, seed), budget)
    reports["fm_050"] = write_run(root / "other" / "fm_050", model, uniform_structure(model, 0.5), 0.5,
                                  dataset="fashion_mnist")
    return root, reports


def assert_labelled(fig):
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_images() + ax.lines + ax.patches]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax


def test_read_runs_and_metrics(runs):
    root, reports = runs
    df = run_files.read_runs(root)
    assert sorted(df["name"]) == sorted(reports)
    assert {"path", "model_name", "macs_ratio", "top1", "dataset"} <= set(df.columns)
    assert run_files.read_runs(root / "nothing_here").empty
    m = run_files.read_metrics(root / "uvc_050")
    assert set(m["stage"]) == {"search", "search_epoch", "finetune_epoch"}
    assert m.attrs["num_heads"] == 6 and run_files.read_report(root / "uvc_050")["budget"] == 0.5


def test_run_folders_of_earlier_versions_read_with_current_keys(runs):
    root, _ = runs
    run = root / "uvc_050"
    rep = json.loads((run / "report.json").read_text())
    rep["macs_ratio_target"], rep["val_top1_after_search"] = rep.pop("budget"), rep.pop("val_top1_before_finetune")
    (run / "report.json").write_text(json.dumps(rep))
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({("macs_ratio" if k == "expected_macs_ratio" else k): v
                                                           for k, v in r.items()}) + "\n" for r in lines))
    r = run_files.read_report(run)
    assert r["budget"] == 0.5 and r["val_top1_before_finetune"] == rep["val_top1_after_search"]
    assert "expected_macs_ratio" in run_files.read_metrics(run)


def test_read_runs_merges_the_run_settings(runs):
    root, _ = runs
    (root / "uvc_070" / "config.yaml").write_text("dataset: digits\nmacs_ratio: 0.7\nkd: none\nsearch_epochs: 3\n"
                                                  "uvc:\n  block_skip: false\n  count_lr: 0.05\n")
    df = run_files.read_runs(root).set_index("name")
    assert df.loc["uvc_070", "method"] == "uvc_prune_only_no_kd" and df.loc["uvc_050", "method"] == "uvc"
    assert df.loc["uvc_070", "kd"] == "none" and df.loc["uvc_070", "search_epochs"] == 3
    assert df.loc["uvc_070", "uvc.block_skip"] == False and df.loc["uvc_070", "uvc.count_lr"] == 0.05  # noqa: E712
    assert df.loc["uvc_070", "dataset"] == "digits"               # the report's own fields win
    rep = json.loads((root / "uvc_050" / "report.json").read_text())
    (root / "uvc_050" / "report.json").write_text(json.dumps(dict(rep, method="magnitude")))
    assert run_files.read_runs(root).set_index("name").loc["uvc_050", "method"] == "magnitude"   # benchmark runs


@pytest.mark.parametrize("cfg, label", [({}, "uvc"), ({"kd": "hard"}, "uvc_hard_kd"),
                                        ({"uvc": {"prune": False}}, "uvc_skip_only"),
                                        ({"uvc": {"block_skip": False}, "kd": "none"}, "uvc_prune_only_no_kd"),
                                        ({"budget_kind": "latency"}, "uvc_latency")])
def test_method_label_names_the_benchmark_variants(cfg, label):
    from uvclab.compare.benchmark import VARIANTS
    assert run_files.method_label(cfg) == label
    for name, overrides in VARIANTS.items():   # the benchmark's variants get their own names back
        if set(overrides) - {"method", "kd", "uvc.prune", "uvc.prune_dims", "uvc.block_skip"}:
            continue                           # a setting change, not an ablation: the report keeps the label
            continue
        cfg = {"uvc": {}}
        for k, v in overrides.items():
            (cfg["uvc"] if k.startswith("uvc.") else cfg)[k.removeprefix("uvc.")] = v
        assert run_files.method_label(cfg) == name


def test_compact_png_is_a_smaller_png_of_the_same_size():
    import io
    from PIL import Image
    fig, ax = plt.subplots(figsize=(4, 3), dpi=90)
    ax.imshow(np.random.default_rng(0).random((30, 30)), cmap="viridis")
    ax.set_title("noise")
    small = viz.compact_png(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    a, b = Image.open(io.BytesIO(small)), Image.open(buf)
    assert a.format == "PNG" and a.mode == "P" and a.size == b.size
    assert len(small) < len(buf.getvalue())
    viz.use_compact_png()                         # outside IPython: nothing to do, no error


def test_read_metrics_skips_half_written_last_line(runs):
    run = runs[0] / "uvc_050"
    n = len(run_files.read_metrics(run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "search", "st')
    assert len(run_files.read_metrics(run)) == n


def test_trace_count_gate_plots(runs):
    m = run_files.read_metrics(runs[0] / "uvc_050")
    for fig in (viz.plot_search_trace(m), viz.plot_counts(m), viz.plot_gates(m)):
        assert_labelled(fig)
    # kept counts: the last step's kept heads of layer L-1 equal H - removed
    fig = viz.plot_counts(m)
    last = m[m.stage == "search"].iloc[-1]
    assert fig.axes[0].lines[-1].get_ydata()[-1] == 6 - last["heads_removed"][-1]
    # without shape information the removed counts are shown, and said so
    m.attrs.clear()
    assert viz.plot_counts(m).axes[0].get_ylabel().startswith("removed")


def test_masks_match_structure(model):
    s = random_structure(model, seed=3)
    fig = viz.plot_masks(s, sort_neurons=False)
    assert_labelled(fig)
    heads, v, mlp = (ax.get_images()[0].get_array() for ax in fig.axes[:3])
    masks = s.masks()
    np.testing.assert_array_equal(heads, np.stack([m["head"].numpy() for m in masks]))
    np.testing.assert_array_equal(v, np.stack([m["v"].numpy().reshape(-1) for m in masks]))
    np.testing.assert_array_equal(mlp, np.stack([m["neuron"].numpy() for m in masks]))
    # skipped block 1 and skipped attention of block 2 are hatched in the heads panel
    hatched = [p.get_y() + 0.5 for p in fig.axes[0].patches if p.get_hatch()]
    assert hatched == [1, 2]
    # sorted neurons keep the per-layer counts
    sorted_mlp = viz.plot_masks(s).axes[2].get_images()[0].get_array()
    np.testing.assert_array_equal(np.asarray(sorted_mlp).sum(1), [len(b.mlp) for b in s.blocks])


def test_ratios_pareto_bars(model):
    structs = {f"B={b}": uniform_structure(model, b) for b in (0.3, 0.5, 0.8)}
    structs["random"] = random_structure(model, 0)
    fig = viz.plot_ratios(structs)
    assert fig.axes[0].get_ylabel() == "kept fraction"           # shared y axis: labelled once
    assert all(ax.get_xlabel() == "layer" and ax.get_title() for ax in fig.axes)
    assert len(fig.axes[0].get_legend_handles_labels()[0]) == 4 and fig.legends
    r = viz.structure_ratios(structs["random"])
    assert r.loc[1, "heads"] == 0 and r.loc[1, "block_skipped"]
    df = pd.DataFrame(dict(method=["UVC"] * 3 + ["uniform"] * 3, macs_ratio=[0.3, 0.5, 0.7] * 2,
                           top1=[70, 78, 82, 60, 72, 80]))
    fig = pareto.plot_pareto(df, teacher=85.0)
    assert_labelled(fig)
    assert len(fig.axes[0].lines) == 3                         # two methods + teacher line
    fig = viz.plot_accuracy_bars(pd.DataFrame(dict(ablation=["full", "no KD", "no skip"], top1=[80, 75.5, 78])),
                                 "ablation", teacher=85.0)
    assert_labelled(fig)
    assert [t.get_text() for t in fig.axes[0].texts] == ["80.00", "75.50", "78.00"]
    lo, hi = fig.axes[0].get_ylim()                            # zoomed so that point-sized gaps show
    assert lo == 72 and hi > 85 and "axis from 72" in fig.axes[0].get_ylabel()
    fig = viz.plot_accuracy_bars(pd.DataFrame(dict(ablation=["a", "b"], top1=[80, 75.5])), "ablation", ymin=0)
    assert fig.axes[0].get_ylim()[0] == 0 and "axis from" not in fig.axes[0].get_ylabel()


def test_render_run(runs):
    root, reports = runs
    text, fig = render_run(root / "uvc_050")
    assert f"{reports['uvc_050']['macs_ratio']:.3f}" in text and "<table" in text
    assert isinstance(fig, Figure)


def test_explorer_slider_updates_summary(runs):
    root, reports = runs
    box = explorer(root)
    # families: dataset / model as built, plus the parent folder when it is not the runs root itself
    assert box.dropdown.options == ("digits / ViT 4x384, patch 8, 32 px",
                                    "fashion_mnist / ViT 4x384, patch 8, 32 px  \u00b7  other")
    assert box.dropdown.value == box.dropdown.options[0]
    assert [lb for lb, _ in box.slider.options] == ["0.50", "0.70"]
    before = box.summary_html.value
    assert f"{reports['uvc_050']['macs_ratio']:.3f}" in before
    assert box.figure_out.outputs[0]["data"]["image/png"]
    box.slider.value = box.slider.options[1][1]
    after = box.summary_html.value
    assert after != before and f"{reports['uvc_070']['macs_ratio']:.3f}" in after
    box.dropdown.value = box.dropdown.options[1]
    assert f"{reports['fm_050']['macs_ratio']:.3f}" in box.summary_html.value
    assert plt.get_fignums() == []                             # figures are closed after display


def test_explorer_live_uniform(tmp_path, model):
    with pytest.raises(UvclabError, match="No finished runs"):
        explorer(tmp_path)
    box = explorer(tmp_path, model=model)
    assert box.dropdown.value == "uniform structure (live)" and box.dropdown.description == "source"
    before = box.summary_html.value
    assert "n/a" not in before and "top-1" not in before           # no accuracy live: no empty cards
    box.slider.value = 0.3
    after = box.summary_html.value
    ratio = count(model, uniform_structure(model, 0.3))["macs"] / count(model)["macs"]
    assert after != before and f"{ratio:.3f}" in after


def test_families_split_by_folder_and_table_proportions(tmp_path, model):
    root = tmp_path / "runs"
    for folder, name, budget in [("sweep", "b030", 0.3), ("sweep", "b050", 0.5), ("ablate", "uvc", 0.5),
                                 ("ablate", "no_kd", 0.5)]:
        write_run(root / folder / name, model, uniform_structure(model, budget), budget)
    box = explorer(root)
    assert set(box.dropdown.options) == {"digits / ViT 4x384, patch 8, 32 px  \u00b7  sweep",
                                         "digits / ViT 4x384, patch 8, 32 px  \u00b7  ablate"}
    assert box.dropdown.value.endswith("sweep")                   # the family with the most budgets first
    assert [lb for lb, _ in box.slider.options] == ["0.30", "0.50"]
    box.dropdown.value = box.dropdown.value.replace("sweep", "ablate")
    assert [lb for lb, _ in box.slider.options] == ["0.50 (no_kd)", "0.50 (uvc)"]
    text = box.summary_html.value
    for header in ("heads kept", "q/k dims per head", "v dims per head", "MLP neurons kept", "attention"):
        assert f">{header}</th>" in text
    s = uniform_structure(model, 0.5)
    b = s.blocks[0]
    assert f">{len(b.heads)}/{s.num_heads}<" in text
    assert f">{len(b.mlp)}/{s.mlp_hidden} ({100 * len(b.mlp) / s.mlp_hidden:.0f} %)<" in text
    assert "max-height" not in text and "padding:1px" in text


def test_explorer_shows_busy_cue(tmp_path, model):
    box = explorer(tmp_path, model=model)
    seen = []
    box.summary_html.observe(lambda c: seen.append(c["new"]), names="value")
    box.slider.value = 0.3
    assert len(seen) == 2 and "computing" in seen[0] and "computing" not in seen[1]


@pytest.mark.parametrize("name, kwargs, label", [
    ("deit_tiny_patch16_224", {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 12, "num_heads": 3},
     "ViT 12x96, patch 7, 28 px"),
    ("deit_small_patch16_224", {}, "ViT 12x384, patch 16, 224 px"),
    ("vit_base_patch32_384", '{"num_classes": 10}', "ViT 12x768, patch 32, 384 px"),
    ("t2t_vit_14", {}, "T2T-ViT 14x384, 224 px"),
    ("something_else", {}, "something_else")])
def test_model_label_names_the_model_as_built(name, kwargs, label):
    assert run_files.model_label(name, kwargs) == label


def test_pareto_points_group_by_settings_and_count_copies_once(tmp_path, model):
    root = tmp_path / "runs"
    cfg = "dataset: digits\nmacs_ratio: {b}\nseed: {s}\nsearch_epochs: {e}\n"
    for folder, name, b, s, e, top1 in [("04_sweep", "b0.5", 0.5, 0, 5, 80.0), ("03_abl", "uvc", 0.5, 0, 5, 80.0),
                                        ("04_sweep", "b0.5_s1", 0.5, 1, 5, 82.0), ("04_sweep", "b0.3", 0.3, 0, 5, 75.0),
                                        ("02_one", "b0.5", 0.5, 0, 9, 70.0)]:
        write_run(root / folder / name, model, uniform_structure(model, b), b, top1=top1)
        (root / folder / name / "config.yaml").write_text(cfg.format(b=b, s=s, e=e))
    runs = run_files.read_runs(root)
    assert set(runs["model"]) == {"ViT 4x384, patch 8, 32 px"}
    pts = run_files.pareto_points(runs, root).set_index(["label", "budget"])
    assert sorted(set(pts.index.get_level_values(0))) == ["uvc (nb 02)", "uvc (nb 03+04)"]  # never averaged together
    p = pts.loc[("uvc (nb 03+04)", 0.5)]
    assert p["seeds"] == 2 and p["runs"] == 3 and p["top1"] == 81.0                       # the copy counts once
    assert abs(p["top1_sd"] - np.std([80, 82], ddof=1)) < 1e-9
    assert pts.loc[("uvc (nb 02)", 0.5), "top1"] == 70.0 and np.isnan(pts.loc[("uvc (nb 02)", 0.5), "top1_sd"])


def _bench_rows(methods, budgets, seeds=(0,)):
    rows = []
    for i, m in enumerate(methods):
        for b in budgets:
            for s in seeds if m in ("uvc", "magnitude") else (0,):
                rows.append(dict(method=m, budget=b, macs_ratio=b - 0.005, top1=80 + 10 * b - i * 0.3 + 0.1 * s,
                                 teacher_top1=89.0, seed=s, val_top1=80 + 10 * b - i * 0.3,
                                 val_top1_before_finetune=70.0, search_end_macs_ratio=b, blocks_kept=12,
                                 params_ratio=b, speedup=1 / b, ort_speedup=1 / b, test_samples=10000))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("methods, budgets", [
    (["uvc", "uvc_norm", "uvc_prune_only", "magnitude", "magnitude_lstsq", "activation", "depth"], [0.5, 0.3, 0.2, 0.15]),
    (["magnitude", "uniform"], [0.5]),                      # no UVC at all
    (["uvc"], [0.3])])                                      # no baseline, one point
def test_benchmark_pareto_any_subset(tmp_path, methods, budgets):
    df = _bench_rows(methods, budgets, seeds=(0, 1, 2))
    paths = pareto.write_results(df, tmp_path, "fashion_mnist")
    assert paths["png"].stat().st_size > 0 and plt.get_fignums() == []
    fig = pareto.plot_benchmark_pareto(df, "fashion_mnist")
    ax = fig.axes[0]
    assert "Fashion-MNIST" in ax.get_title() and "10,000-image test set" in ax.get_title()
    assert ("3 seeds" in ax.get_title()) == any(m in methods for m in ("uvc", "magnitude"))
    assert fig.legends and ax.get_legend() is None                   # the legend sits outside the axes
    lines = {c.get_label(): c.lines[0] for c in ax.containers}    # errorbar containers: label -> data line
    if "uvc" in methods and "magnitude" in methods:
        assert lines["uvc"].get_linewidth() > lines["depth"].get_linewidth()
        assert "error bars: sd over seeds" in fig.get_supxlabel().replace("\n", " ")
        assert lines["magnitude"].get_linewidth() == lines["uvc"].get_linewidth()   # the best baseline is bold


def test_speedup_and_accuracy_latency_figures_say_what_is_timed():
    from uvclab.ui.latency_viz import plot_accuracy_latency, plot_speedup
    sweep = pd.DataFrame({"MACs ratio": [0.3, 0.5, 0.7], "speedup": [2.9, 1.8, 1.3]})
    run = pd.DataFrame([{"label": "run b0.50 vs its teacher", "MACs ratio": 0.5, "speedup": 1.5}])
    fig = plot_speedup(sweep, "uniform structures, random weights", run, title="timed", caption="what is timed")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "1.50x (75 % of ideal)" in texts and "1.80x (90 % of ideal)" in texts
    assert any("run b0.50" in t.get_text() for t in ax.get_legend().get_texts())
    both = pd.DataFrame({"budget kind": ["latency", "macs"], "budget": [0.5, 0.4], "measured latency ratio": [0.49, 0.53],
                         "MACs ratio": [0.39, 0.4], "test top-1": [87.4, 87.2], "test images": [10000, 10000]},
                        index=["b0.50", "macs_b0.400"])
    fig = plot_accuracy_latency(both, teacher_top1=89.0, budget=0.5, title="t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert all("10,000 test images" in lb for lb in labels if "%" in lb) and len(fig.axes[0].containers) == 2
