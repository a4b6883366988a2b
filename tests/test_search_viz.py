"""uvclab.ui.search_viz: the facts and figures notebooks 02-04 quote, on fake run folders (the formats
`uvclab compress` writes; `fake_metrics` / `write_run` from test_viz)."""
import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from conftest import random_structure, small_vit  # noqa: E402
from test_viz import write_run  # noqa: E402
from uvclab import UvclabError  # noqa: E402
from uvclab.compare.runs import read_metrics  # noqa: E402
from uvclab.ui import run_facts as rf  # noqa: E402
from uvclab.ui import search_viz as sv  # noqa: E402
from uvclab.vit.structure import Structure  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield small_vit()
    torch.set_num_threads(n)


@pytest.fixture
def run(tmp_path, model):
    st = random_structure(model, seed=1)
    report = write_run(tmp_path / "run", model, st, 0.5)
    rng = np.random.default_rng(0)
    L, H, Dh, M = st.depth, st.num_heads, st.head_dim, st.mlp_hidden
    scores = {"heads": rng.random((L, H)).tolist(), "dims": rng.random((L, H, Dh)).tolist(),
              "neurons": (10.0 ** rng.uniform(-8, -2, (L, M))).tolist()}
    (tmp_path / "run" / "uvc_state.json").write_text(json.dumps({"z": 0.1, "scores": scores}))
    return tmp_path / "run", st, report


def test_search_facts(run):
    folder, st, report = run
    m = read_metrics(folder)
    f = sv.search_facts(m, report, tol=0.01)
    s = m[m.stage == "search"]
    assert f["budget"] == 0.5 and f["r_end"] == pytest.approx(s.expected_macs_ratio.iloc[-1])
    assert f["r_min"] <= f["r_end"] and f["exported_macs_ratio"] == report["macs_ratio"]
    # fake_metrics: R = 1 - 0.5 sqrt(t) reaches 0.51 only at the end (t >= 0.96)
    R = s.expected_macs_ratio.to_numpy()
    first = s.step.to_numpy()[np.flatnonzero(R <= 0.51)]
    assert f["r_within_tol_step"] == (int(first[0]) if len(first) else None)
    assert f["search_start_step"] == 8                                 # 8 warm-up steps
    skip = 1 - np.array(s.keep_prob.tolist())
    assert f["max_skip_prob"] == pytest.approx(skip.max()) and f["max_skip_layer"] == 1
    assert f["skip_prob_change_max"] == pytest.approx((skip[-1] - skip[0]).max())


def test_kept_counts_need_the_shape(run):
    folder, st, _ = run
    m = read_metrics(folder)
    k = sv.kept_counts(m)
    assert k["heads"].shape == (40, st.depth) and (k["heads"][0] == st.num_heads).all()
    m.attrs.clear()
    with pytest.raises(UvclabError, match="shape"):
        sv.kept_counts(m)


def test_figures(run):
    folder, st, _ = run
    m = read_metrics(folder)
    scores = sv.read_scores(folder)
    steps = sv.snapshot_steps(m, 5)
    assert len(steps) == 5 and steps[0] == 8 and steps[-1] == 39 and steps == sorted(steps)
    for fig in (sv.plot_count_heatmaps(m), sv.plot_count_heatmaps(m, st, dims_multiple=8),
                sv.plot_mask_snapshots(m, steps), sv.plot_skip_heatmap(m), sv.plot_score_distribution(scores, st)):
        assert isinstance(fig, Figure)
    assert len(sv.plot_count_heatmaps(m, st, 8).axes) == 4 + 3           # 4 panels + 3 colour bars


def test_scores_and_cuts(run, tmp_path):
    folder, st, _ = run
    scores = sv.read_scores(folder)
    assert scores["v_dims"].shape == (st.depth, st.num_heads, st.head_dim)
    cuts = sv.score_cuts(scores, st)
    kept = rf.kept_arrays(st)
    for t in sv.TYPES:
        assert cuts.loc[t, "kept"] == kept[t].sum() and cuts.loc[t, "kept"] + cuts.loc[t, "removed"] == kept[t].size
        sc = scores[t]
        assert cuts.loc[t, "lowest_kept"] == sc[kept[t]].min()
        assert cuts.loc[t, "removed_above_lowest_kept"] == (sc[~kept[t]] > sc[kept[t]].min()).sum()
    # a skipped block's groups count as removed
    assert not kept["heads"][1].any() and not kept["neurons"][1].any() and not kept["v_dims"][2].any()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "uvc_state.json").write_text(json.dumps({"z": 0.1}))
    assert sv.read_scores(tmp_path / "other") is None and sv.read_scores(tmp_path / "none") is None


def test_binomial_se_and_noise_pairs():
    assert rf.binomial_se(90.0, 10000) == pytest.approx(100 * math.sqrt(0.9 * 0.1 / 10000))
    assert rf.binomial_se(np.array([50.0, 100.0]), 100).tolist() == pytest.approx([5.0, 0.0])
    pairs = rf.noise_pairs({"a": 87.5, "b": 87.2, "c": 85.0}, {"a": 0.33, "b": 0.33, "c": 0.36})
    assert len(pairs) == 3 and pairs.difference.abs().is_monotonic_decreasing
    ab = pairs[(pairs.a == "a") & (pairs.b == "b")].iloc[0]
    assert ab.within_noise and ab.se == pytest.approx(math.hypot(0.33, 0.33))
    assert not pairs[(pairs.a == "a") & (pairs.b == "c")].iloc[0].within_noise
    import pandas as pd
    fig = rf.plot_accuracy_dots(pd.DataFrame({"v": ["a", "b"], "top1": [87.5, 87.2], "se": [0.3, 0.3]}), "v",
                                "top1", "se", teacher=89.0)
    assert isinstance(fig, Figure)


def test_structure_comparisons(model):
    dense = Structure.dense(model)
    a = random_structure(model, seed=1, skip=False)
    d = rf.structure_difference(a, a)
    assert (d == 0).all()
    d = rf.structure_difference(dense, a)
    k = rf.kept_arrays(a)
    assert d["neurons"] == pytest.approx(1 - k["neurons"].mean()) and 0 < d["all"] < 1 and d["blocks"] == 0
    # nested: dense contains everything; a smaller structure kept inside a larger one
    nest = rf.nestedness({0.9: dense, 0.5: a})
    assert (nest.violations == 0).all() and set(nest.type) == set(sv.TYPES)
    nest = rf.nestedness({0.5: dense, 0.9: a})                       # the larger budget keeps less: violations
    v = nest.set_index("type").violations
    assert v["neurons"] == (~k["neurons"]).sum() and v["heads"] == (~k["heads"]).sum()
    kb = rf.kept_by_type({0.5: a, 1.0: dense})
    assert kb.loc[1.0, "heads"] == 1.0 and kb.loc[0.5, "neurons"] == pytest.approx(k["neurons"].mean())
    e = rf.edge_blocks({0.5: a})
    assert len(e) == 3 and e.set_index("type").loc["neurons", "first"] == pytest.approx(k["neurons"][0].mean())


def test_model_name():
    kw = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 12, "num_heads": 3}
    assert sv.model_name({"name": "deit_tiny_patch16_224", "kwargs": kw}) == "ViT 12x96, 3 heads, patch 7, 28 px"
    assert sv.model_name({"name": "deit_tiny_patch16_224", "kwargs": {}}) == "deit_tiny_patch16_224"
