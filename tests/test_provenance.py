"""provenance(): families are the runs of one teacher and recipe (a papermill sweep, a benchmark), and each
run's `changes` are its settings that differ from the family's most common value. Run folders here hold only
config.yaml and report.json (what provenance reads), so the test takes well under a second."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import yaml

from uvclab.compare.provenance import family_summary, provenance
from uvclab.engine.config import load_config
from uvclab.ui.compare_figures import plot_provenance


def fake_run(folder, top1, **overrides):
    cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()]).to_dict()
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = {"method": cfg["method"], "dataset": cfg["dataset"], "budget": cfg["macs_ratio"], "seed": cfg["seed"],
              "top1": top1, "teacher_top1": 96.67, "macs": int(1e6 * cfg["macs_ratio"]), "macs_ratio": cfg["macs_ratio"] - 0.01,
              "model": {"name": "deit_tiny_patch16_224", "kwargs": {}}}
    (folder / "report.json").write_text(json.dumps(report))


def test_sweeps_and_benchmarks_are_families_with_their_changes(tmp_path):
    for b in (0.3, 0.5, 0.7):                               # a papermill budget sweep of notebook 02
        fake_run(tmp_path / "sweep" / "02_mask_learning" / f"search_b{b:.2f}", 90 + b, macs_ratio=b)
    bench = tmp_path / "bench" / "runs"                      # a benchmark: methods x seeds, its own recipe
    for m, s in (("uvc", 0), ("uvc", 1), ("magnitude", 0)):
        fake_run(bench / f"{m}_s{s}", 91 + s, method=m, seed=s, finetune_epochs=6, **{"uvc.zlr": 0.5})
    fake_run(bench / "uvc_no_kd", 89.0, kd="none", finetune_epochs=6, **{"uvc.zlr": 0.5})
    fake_run(tmp_path / "long" / "one", 92.0, finetune_epochs=30)      # another recipe, alone
    p = provenance(tmp_path)
    assert len(p) == 8 and set(p["teacher"]) == {"digits_vit"} and (p["teacher_top1"].round(2) == 96.67).all()  # the card's
    fam = p.set_index("run")["family"]
    assert fam.nunique() == 3
    assert fam["sweep/02_mask_learning/search_b0.30"] == "digits_vit: sweep/02_mask_learning"
    assert len({fam[f"bench/runs/{n}"] for n in ("uvc_s0", "uvc_s1", "magnitude_s0", "uvc_no_kd")}) == 1
    changes = p.set_index("run")["changes"]
    assert (changes == "").all()              # budget, method, seed, kd have their own columns
    assert sorted(p[p.run.str.startswith("sweep")].budget) == [0.3, 0.5, 0.7]
    assert p.set_index("run").loc["bench/runs/uvc_no_kd", "kd"] == "none"
    fake_run(bench / "uvc_gates", 90.5, finetune_epochs=6, **{"uvc.zlr": 0.5, "uvc.gating_weight": 1.0})
    fake_run(bench / "magnitude_s1", 90.5, method="magnitude", seed=1, finetune_epochs=6)   # no uvc.zlr: ignored
    changes = provenance(tmp_path).set_index("run")["changes"]
    assert changes["bench/runs/uvc_gates"] == "uvc.gating_weight=1"
    assert (changes.drop("bench/runs/uvc_gates") == "").all()
    fake_run(tmp_path / "sweep" / "02_mask_learning" / "tied", 90.0, **{"uvc.zlr": 0.5})
    fake_run(tmp_path / "sweep" / "02_mask_learning" / "tied2", 90.0, **{"uvc.zlr": 0.5})
    fake_run(tmp_path / "sweep" / "02_mask_learning" / "tied3", 90.0, **{"uvc.zlr": 0.5})
    changes = provenance(tmp_path).set_index("run")["changes"]     # 3 runs at zlr 0.5 vs 3 at the default: a tie
    assert changes["sweep/02_mask_learning/tied"] == "uvc.zlr=0.5" and changes["sweep/02_mask_learning/search_b0.30"] != ""
    p = provenance(tmp_path)
    s = family_summary(p)
    assert s["runs"].sum() == 13 and s.loc[("digits_vit", "digits_vit: bench/runs"), "methods"] == "magnitude, uvc, uvc_no_kd"
    fig = plot_provenance(p)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("bench/runs (6 runs)" in t for t in texts) and any("kd none" in t for t in texts) and any("uvc.zlr=0.5" in t for t in texts)
    plt.close(fig)
    assert provenance(tmp_path / "empty").empty


def test_a_setting_no_run_of_the_family_uses_has_no_reference_value():
    from uvclab.compare.provenance import _reference
    assert _reference([]) is None                    # e.g. uvc.* keys in a family of one-shot runs only
    assert _reference(["a", "a", "b"]) == "a" and _reference(["a", "b"]) is None
