"""compare_runs on small real digits runs: numbers agree with the runs' reports and with each other, the
prediction cache is used and invalidated, bad pairs are clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from small_runs import make_small_runs
from uvclab.compare import predictions
from uvclab.compare.behaviour import compare_runs
from uvclab.errors import UvclabError

pytestmark = pytest.mark.slow   # the fixture trains two small runs (about 10 s)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_small_runs(tmp_path_factory.mktemp("runs"))


def report(run):
    return json.loads((run / "report.json").read_text())


def test_numbers_agree_with_the_reports_and_each_other(runs):
    uvc, mag = runs["sweep/uvc_b0.50"], runs["baselines/magnitude_b0.50"]
    c = compare_runs(uvc, mag)
    assert len(c.labels) == report(uvc)["test_samples"] == 270
    assert c.top1_a == pytest.approx(report(uvc)["top1"]) and c.top1_b == pytest.approx(report(mag)["top1"])
    pc = c.per_class
    assert list(pc.index) == [str(i) for i in range(10)] and pc.images.sum() == 270
    assert np.allclose(pc.delta, pc.acc_b - pc.acc_a)
    assert np.allclose((pc.acc_a * pc.images).sum() / 270, c.top1_a)
    assert (c.confusion_delta.sum(1) == 0).all()                 # each true class keeps its images
    assert np.array_equal(np.diag(c.confusion_delta), np.diag(c.confusion_b) - np.diag(c.confusion_a))
    assert c.agreement == pytest.approx(np.mean(c.pred_a == c.pred_b)) and 0 < c.agreement <= 1
    r2w, w2r = c.right_to_wrong, c.wrong_to_right
    assert ((c.pred_a[r2w] == c.labels[r2w]) & (c.pred_b[r2w] != c.labels[r2w])).all()
    assert ((c.pred_a[w2r] != c.labels[w2r]) & (c.pred_b[w2r] == c.labels[w2r])).all()
    assert len(w2r) - len(r2w) == (c.pred_b == c.labels).sum() - (c.pred_a == c.labels).sum()
    assert c.mean_kl > 0
    flips = c.flipped("right_to_wrong")
    assert len(flips) == len(r2w) and (flips.label == flips.pred_a).all() and (flips.label != flips.pred_b).all()
    assert c.images(r2w[:3]).shape == (min(3, len(r2w)), 8, 8) and 0 <= c.images(r2w[:3]).min()
    same = compare_runs(uvc, uvc)
    assert same.agreement == 1 and same.mean_kl == pytest.approx(0, abs=1e-9) and len(same.right_to_wrong) == 0


def test_teacher_side_and_structure_difference(runs):
    uvc = runs["sweep/uvc_b0.50"]
    c = compare_runs("teacher", uvc)
    assert c.a.kind == "teacher" and c.top1_a == pytest.approx(report(uvc)["teacher_top1"])
    st = c.structure_b
    d = c.structure_diff
    assert (d.heads_only_b == 0).all() and (d.mlp_only_b == 0).all()   # the run keeps a subset of the dense model
    assert list(d.mlp_both) == [len(b.mlp) if b.runs_mlp else 0 for b in st.blocks]
    assert list(d.mlp_only_a) == [st.mlp_hidden - n for n in d.mlp_both]
    assert (d.heads_both + d.heads_only_a == st.num_heads).all()
    d2 = compare_runs(uvc, runs["baselines/magnitude_b0.50"]).structure_diff
    assert (d2.mlp_both + d2.mlp_only_a == d.mlp_both).all()
    mag = runs["baselines/magnitude_b0.50"]
    compare_runs(mag, "teacher")               # the teacher's logits are in memory; mag's folder gets a copy too
    assert (mag / "predictions" / "teacher_test_logits.safetensors").is_file()


def test_predictions_are_cached_and_invalidated_when_the_model_changes(runs, tmp_path, monkeypatch):
    run = tmp_path / "copy"
    shutil.copytree(runs["sweep/uvc_b0.50"], run)
    first = compare_runs(run, "teacher")
    files = sorted(p.name for p in (run / "predictions").iterdir())
    assert files == ["model_test_logits.safetensors", "teacher_test_logits.safetensors"]
    predictions._MEMO.clear()
    calls = []
    real = predictions.compute_logits
    monkeypatch.setattr(predictions, "compute_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = compare_runs(run, "teacher")
    assert calls == [] and np.array_equal(again.logits_a, first.logits_a)       # read from the run folder
    from safetensors.torch import load_file, save_file
    weights = run / "model" / "model.safetensors"
    sd = load_file(str(weights))
    sd["head.bias"][3] += 5.0                                      # the model changes: class 3 is favoured
    save_file(sd, str(weights), metadata={"format": "pt"})
    changed = compare_runs(run, "teacher")
    assert calls == [1]                                   # the model was recomputed, the teacher was not
    assert not np.array_equal(changed.logits_a, first.logits_a)


def test_bad_pairs_are_clear_errors(runs, tmp_path):
    uvc = runs["sweep/uvc_b0.50"]
    with pytest.raises(UvclabError, match="Both sides are 'teacher'"):
        compare_runs("teacher", "teacher")
    with pytest.raises(UvclabError, match="pass a run folder there"):
        compare_runs("teacher", predictions.default_teacher("digits").with_suffix(".json"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(uvc, unfinished, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(UvclabError, match=r"no exported model \(model/model.safetensors and model/uvclab.json "
                                          r"missing\).*--resume"):
        compare_runs(unfinished, uvc)
    other = tmp_path / "fashion"
    shutil.copytree(uvc, other, ignore=shutil.ignore_patterns("predictions"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump(dict(cfg, dataset="fashion_mnist")))
    with pytest.raises(UvclabError, match="made on digits and 'fashion' on fashion_mnist"):
        compare_runs(uvc, other)
    (other / "config.yaml").write_text(yaml.safe_dump(dict(cfg, split_seed=1)))
    with pytest.raises(UvclabError, match="different digits test splits"):
        compare_runs(uvc, other)
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    card = json.loads((other / "model" / "uvclab.json").read_text())
    card["model"]["kwargs"]["num_classes"] = 5
    (other / "model" / "uvclab.json").write_text(json.dumps(card))
    with pytest.raises(UvclabError, match="label sets differ"):
        compare_runs(uvc, other)


def test_figures_have_labelled_axes(runs):
    import matplotlib.pyplot as plt
    from uvclab.compare.runs import read_runs
    from uvclab.ui import compare_figures as cf
    c = compare_runs(runs["sweep/uvc_b0.30"], runs["sweep/uvc_b0.50"])
    root = runs["sweep/uvc_b0.30"].parents[1]
    figs = [cf.plot_runs_scatter(read_runs(root), str(runs["sweep/uvc_b0.30"]), "teacher", 96.67),
            cf.plot_class_delta(c), cf.plot_confusion_delta(c), cf.plot_structure_diff(c.structure_diff)]
    for fig in figs:
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), fig
        plt.close(fig)
    gallery = cf.plot_flipped_gallery(c, "wrong_to_right", limit=4)
    shown = [ax.get_title() for ax in gallery.axes if ax.get_images()]
    assert len(shown) == min(4, len(c.wrong_to_right)) and all("A: " in t and "B: " in t for t in shown)
    plt.close(gallery)


def test_compare_view_follows_the_selection(runs):
    from uvclab.ui.compare_view import compare_view
    root = runs["sweep/uvc_b0.30"].parents[1]
    box = compare_view(root)
    paths = [v for _, v in box.run_a.options]
    assert paths[0] == "teacher" and len(paths) == 4 and box.run_a.value == "teacher"
    png = lambda out: out.outputs[0]["data"]["image/png"]  # noqa: E731
    before = (box.summary_html.value, png(box.class_out), png(box.gallery_out), png(box.structure_out))
    assert "agreement" in before[0] and box.comparison.a.kind == "teacher"
    n = f"{len(box.comparison.labels):,} test images"
    assert n in before[0] and all("test images" in lb for lb, v in box.run_a.options if v != "teacher")
    box.run_a.value = str(runs["baselines/magnitude_b0.50"])
    box.run_b.value = str(runs["sweep/uvc_b0.30"])
    after = (box.summary_html.value, png(box.class_out), png(box.gallery_out), png(box.structure_out))
    assert box.comparison.a.label == "magnitude_b0.50" and box.comparison.b.label == "uvc_b0.30"
    assert all(x != y for x, y in zip(before, after)), "summary, per-class chart, gallery and structure follow"
    box.kind.value = "wrong \u2192 right"
    assert png(box.gallery_out) != after[2] and "wrong to right" not in box.summary_html.value
    box.run_b.value = "teacher"
    box.run_a.value = "teacher"
    assert "Cannot compare" in box.summary_html.value and box.gallery_out.outputs == ()
    from uvclab.ui.compare_view import workbench
    tabs = workbench(root)                      # the structure explorer and the Compare view side by side
    assert [tabs.get_title(i) for i in range(2)] == ["Structure", "Compare"]
    assert "uvclab-compare" in tabs.children[1]._dom_classes and tabs.children[0].slider is not None


def test_flip_confidence_and_find_run(runs):
    from uvclab.compare.behaviour import flip_confidence
    from uvclab.compare.runs import find_run
    from uvclab.engine.config import CompressConfig
    uvc = runs["sweep/uvc_b0.30"]
    c = compare_runs("teacher", uvc)
    f = flip_confidence(c)
    assert f["a_right"] == (c.pred_a == c.labels).sum() and f["flipped"] == len(c.right_to_wrong)
    conf = c.prob_a.max(1)
    assert f["median_conf_flipped"] == pytest.approx(np.median(conf[c.right_to_wrong]))
    assert 0 <= f["share_of_flips_in_low"] <= 1 and 0 <= f["auroc_low_conf"] <= 1
    n_low = int(np.ceil(0.25 * f["a_right"]))
    rate = lambda: f["flip_rate_low"] * n_low + f["flip_rate_rest"] * (f["a_right"] - n_low)  # noqa: E731
    assert rate() == pytest.approx(f["flipped"], abs=2)      # the two rates split the flips (ties aside)
    cfg = CompressConfig.from_dict(yaml.safe_load((uvc / "config.yaml").read_text()))
    assert find_run(cfg.to_dict(), uvc.parents[1]) == uvc
    assert find_run(dict(cfg.to_dict(), seed=7), uvc.parents[1]) is None
