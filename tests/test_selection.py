"""UVC's final structure: skip candidates chosen on validation, and the measured-latency feedback."""
import pytest
import torch

import uvclab
from uvclab.engine import selection
from uvclab.engine.config import load_config
from uvclab.errors import UvclabError
from uvclab.uvc import UVCPrimalDual, UVCSettings, select_structure
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
    score = selection.candidate_score(load_config(overrides=["select_finetune_steps=0"]), model, None, None, val)
    st, skip, records = selection.skips_by_validation(uvc, model, score, val, slack=0.85, layout="compact",
                                                      patience=2)
    assert records[0]["skipped"] == [] and records[1]["skipped"] == [1]
    assert records[1]["val_top1"] == 100.0 > records[0]["val_top1"]
    assert skip == [1] and [b.keep for b in st.blocks] == [True, False, True, True]
    assert len(records) == 4  # two candidates in a row below the best, then stop
    # with the band [0.6, 0.9] the third candidate (two blocks skipped, 0.5 of dense) is under it: the last one
    _, _, records = selection.skips_by_validation(uvc, model, score, val, slack=0.3, layout="compact")
    assert len(records) == 3 and records[-1]["cost_ratio"] < 0.6 <= records[-2]["cost_ratio"]
    assert uvclab.count(model, st)["macs"] <= 0.9 * uvclab.count(model)["macs"]


def _latency_uvc(budget=0.6):
    model = gate_vit(small_vit(embed_dim=64, num_heads=4, depth=2))
    table = synthetic_table(vit_shape(model))
    return model, table, UVCPrimalDual(model, UVCSettings(), budget=budget, latency=table)


def _device(table, slowdown):
    """A fake device: the table's prediction times `slowdown` (1 = the table is right)."""
    dense_pred = table.predicted_dense_ms(2)

    def measured(dense, slim, *a):
        return slowdown * table.structure_ms(Structure.from_dict(slim.uvclab_export["structure"])) / dense_pred
    return measured


def test_feedback_refits_until_the_measured_latency_fits(monkeypatch):
    model, table, uvc = _latency_uvc(0.6)
    monkeypatch.setattr(selection, "_measured_ratio", _device(table, 1.25))
    st0 = select_structure(uvc, 0.05)
    st, rounds = selection.measured_feedback(uvc, model, st0, [], 0.6, 0.05, "compact", rounds=3, tolerance=0.02)
    assert rounds[0]["measured"] > 0.6 * 1.02 and "next_target" in rounds[0]
    assert rounds[-1]["measured"] <= 0.6 * 1.02 and 1 < len(rounds) <= 4
    assert rounds[-1]["predicted"] < rounds[0]["predicted"]
    assert table.structure_ms(st) < table.structure_ms(st0)


def test_feedback_keeps_a_structure_that_fits_and_stops_after_its_rounds(monkeypatch):
    model, table, uvc = _latency_uvc(0.6)
    st0 = select_structure(uvc, 0.05)
    monkeypatch.setattr(selection, "_measured_ratio", _device(table, 1.0))
    st, rounds = selection.measured_feedback(uvc, model, st0, [], 0.6, 0.05, "compact")
    assert len(rounds) == 1 and st is st0
    monkeypatch.setattr(selection, "_measured_ratio", _device(table, 3.0))  # can never fit: gives up after 1 refit
    _, rounds = selection.measured_feedback(uvc, model, st0, [], 0.6, 0.05, "compact", rounds=1)
    assert len(rounds) == 2


def test_selection_config_keys():
    cfg = load_config(overrides=["budget_kind=latency"])
    assert selection.skip_mode(cfg) == "validation" and selection.skip_mode(load_config()) == "gates"
    assert selection.skip_mode(load_config(overrides=["select_skips=validation"])) == "validation"
    for bad in (["select_skips=all"], ["latency_feedback=-1"], ["select_patience=0"], ["select_finetune_steps=-1"], ["select_eval_samples=0"]):
        with pytest.raises(UvclabError):
            load_config(overrides=bad)


def test_macs_target_of_a_latency_budget_search_on_macs():
    from uvclab.engine.search import macs_budget_for_latency
    model, table, _ = _latency_uvc()
    lo, hi = (macs_budget_for_latency(model, table, b, "compact") for b in (0.4, 0.7))
    assert 0 < lo < hi < 1
    with pytest.raises(UvclabError, match="search_resource"):
        load_config(overrides=["search_resource=flops"])


def test_candidates_give_kept_blocks_their_full_head_width_back():
    model = gate_vit(small_vit(depth=4))
    uvc = UVCPrimalDual(model, UVCSettings(), budget=0.6)
    Dh = uvc.shape.head_dim
    with torch.no_grad():
        uvc.r.fill_(Dh / 2)  # the search left every head at half its value width
    narrow = selection.fit_structure(uvc, 0.05, "compact", skip=[1, 2])
    assert all(len(d) == Dh // 2 for b in narrow.blocks if b.keep for d in b.v_dims)
    st = selection.fit_candidate(uvc, 0.05, "compact", [1, 2])
    assert [b.keep for b in st.blocks] == [True, False, False, True]
    assert all(len(d) == Dh for b in st.blocks if b.keep for d in b.v_dims)
    assert selection.cost_ratio(uvc, st, "compact") <= 0.6
