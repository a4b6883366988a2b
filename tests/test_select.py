"""UVC's final structure (uvclab/uvc/select.py): the fit, skip candidates chosen on validation, the
measured-latency feedback, and the one verb `final_structure` that decides."""
import pytest
import torch

import uvclab
from uvclab.engine.config import load_config
from uvclab.engine.loop import evaluate
from uvclab.errors import UvclabError
from uvclab.prune.baselines import macs_budget_for_latency
from uvclab.uvc import UVCPrimalDual, UVCSettings, final_structure, fit_structure, select
from uvclab.uvc.select import cost_ratio
from uvclab.vit.gated import gate_vit, open_all_gates
from uvclab.vit.macs import vit_shape
from uvclab.vit.structure import Structure, apply_structure

from conftest import small_vit
from test_latency import synthetic_table


def _labels_of(model, structure, x):
    """Labels that the model with `structure` applied predicts (so that structure scores 100 %)."""
    apply_structure(model, structure)
    with torch.no_grad():
        y = model(x).argmax(-1)
    open_all_gates(model)
    return y


def test_skip_candidates_keep_the_one_best_on_validation():
    model = gate_vit(small_vit(depth=4))
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    truth = Structure.dense(model)
    truth.blocks[1].keep = False  # the 'right' model lacks block 1: skipping it is what validation rewards
    val = torch.utils.data.TensorDataset(x, _labels_of(model, truth, x))
    uvc = UVCPrimalDual(model, UVCSettings(), budget=0.9)
    score = select.candidate_score(model, "compact", val, evaluate, None, steps=0)
    top1 = lambda st: select.masked_top1(model, st, val, evaluate)  # noqa: E731
    st, skip, records = select.skips_by_validation(uvc, model, score, top1, slack=0.85, layout="compact", patience=2)
    assert records[0]["skipped"] == [] and records[1]["skipped"] == [1]
    assert records[1]["val_top1"] == 100.0 > records[0]["val_top1"]
    assert skip == [1] and [b.keep for b in st.blocks] == [True, False, True, True]
    assert len(records) == 4  # two candidates in a row below the best, then stop
    # with the band [0.6, 0.9] the third candidate (two blocks skipped, 0.5 of dense) is under it: the last one
    _, _, records = select.skips_by_validation(uvc, model, score, top1, slack=0.3, layout="compact")
    assert len(records) == 3 and records[-1]["cost_ratio"] < 0.6 <= records[-2]["cost_ratio"]
    assert uvclab.count(model, st)["macs"] <= 0.9 * uvclab.count(model)["macs"]


def _latency_uvc(budget=0.6):
    model = gate_vit(small_vit(embed_dim=64, num_heads=4, depth=2))
    table = synthetic_table(vit_shape(model))
    return model, table, UVCPrimalDual(model, UVCSettings(), budget=budget, latency=table)


def _device(table, slowdown):
    """A fake device's timer: ms of [dense, slim] = the table's prediction times `slowdown` for the slim one."""
    def timer(models):
        slim = Structure.from_dict(models[1].uvclab_export["structure"])
        return [table.predicted_dense_ms(2), slowdown * table.structure_ms(slim)]
    return timer


def test_feedback_refits_until_the_measured_latency_fits():
    model, table, uvc = _latency_uvc(0.6)
    st0 = fit_structure(uvc, 0.05)
    st, rounds = select.measured_feedback(uvc, model, st0, [], 0.6, 0.05, "compact", _device(table, 1.25), rounds=3,
                                         tolerance=0.02)
    assert rounds[0]["measured"] > 0.6 * 1.02 and "next_target" in rounds[0]
    assert rounds[-1]["measured"] <= 0.6 * 1.02 and 1 < len(rounds) <= 4
    assert rounds[-1]["predicted"] < rounds[0]["predicted"]
    assert table.structure_ms(st) < table.structure_ms(st0)


def test_feedback_keeps_a_structure_that_fits_and_stops_after_its_rounds():
    model, table, uvc = _latency_uvc(0.6)
    st0 = fit_structure(uvc, 0.05)
    st, rounds = select.measured_feedback(uvc, model, st0, [], 0.6, 0.05, "compact", _device(table, 1.0))
    assert len(rounds) == 1 and st is st0
    # can never fit: gives up after 1 refit
    _, rounds = select.measured_feedback(uvc, model, st0, [], 0.6, 0.05, "compact", _device(table, 3.0), rounds=1)
    assert len(rounds) == 2


def test_final_structure_decides_skips_and_feedback_by_the_budget_kind():
    model, table, uvc = _latency_uvc(0.6)  # searched on latency: validation candidates, then the timer
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long))
    st, info = final_structure(uvc, model, 0.6, table, 0.05, val_set=val, evaluate=evaluate,
                               finetune=lambda slim, steps: None, timer=_device(table, 1.0))
    assert info["select_skips"] == "validation" and info["skip_candidates"][0]["skipped"] == []
    assert len(info["latency_feedback"]) == 1 and "search_macs_budget" not in info
    assert cost_ratio(uvc, st) <= 0.6 and info["skipped_blocks"] == [l for l, b in enumerate(st.blocks) if not b.keep]
    macs = UVCPrimalDual(model, UVCSettings(), budget=0.5)  # a MACs budget: the gates, no timing
    st, info = final_structure(macs, model, 0.5)
    assert info == {"select_skips": "gates", "skipped_blocks": [],
                    "search_structure_cost_ratio": cost_ratio(macs, uvclab.uvc.current_structure(macs))}
    assert uvclab.count(model, st)["macs"] <= 0.5 * uvclab.count(model)["macs"]


def test_a_search_on_macs_is_refitted_to_the_latency_budget():
    model, table, _ = _latency_uvc()
    lo, hi = (macs_budget_for_latency(model, table, b, "compact") for b in (0.4, 0.7))
    assert 0 < lo < hi < 1
    uvc = UVCPrimalDual.for_search(model, UVCSettings(select_skips="gates", latency_feedback=0), 0.6, table)
    searched = macs_budget_for_latency(model, table, 0.6, "compact")
    assert uvc.latency is None and uvc.budget_kind == "macs" and uvc.budget == searched
    st, info = final_structure(uvc, model, 0.6, table, 0.05)
    assert info["search_macs_budget"] == searched and "latency_feedback" not in info
    assert (uvc.budget, uvc.latency, uvc.budget_kind) == (0.6, table, "latency")  # set_budget keeps them together
    assert uvc.dense_ms == pytest.approx(table.predicted_dense_ms(2), rel=1e-6)
    assert 0.55 <= cost_ratio(uvc, st) <= 0.6


def test_uvc_config_keys():
    cfg = load_config(overrides=["budget_kind=latency", "select_skips=validation"])
    assert cfg.uvc.select_skips == "validation"
    for bad in (["select_skips=all"], ["latency_feedback=-1"], ["select_patience=0"], ["select_finetune_steps=-1"],
                ["select_eval_samples=0"], ["uvc.search_resource=flops"]):
        with pytest.raises(UvclabError, match=bad[0].split("=")[0].split(".")[-1]):
            load_config(overrides=bad)


def test_candidates_give_kept_blocks_their_full_head_width_back():
    model = gate_vit(small_vit(depth=4))
    uvc = UVCPrimalDual(model, UVCSettings(), budget=0.6)
    Dh = uvc.shape.head_dim
    with torch.no_grad():
        uvc.r.fill_(Dh / 2)  # the search left every head at half its value width
    narrow = fit_structure(uvc, 0.05, "compact", skip=[1, 2])
    assert all(len(d) == Dh // 2 for b in narrow.blocks if b.keep for d in b.v_dims)
    st = fit_structure(uvc, 0.05, "compact", skip=[1, 2], widen=True)
    assert [b.keep for b in st.blocks] == [True, False, False, True]
    assert all(len(d) == Dh for b in st.blocks if b.keep for d in b.v_dims)
    assert cost_ratio(uvc, st, "compact") <= 0.6
