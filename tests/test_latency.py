"""Latency budget: the table's interpolation, its cache, the resource R and the budget_kind path end to end."""
import json
from functools import partial

import pytest
import torch

import uvclab
from uvclab.engine.config import load_config
from uvclab.errors import UvclabError
from uvclab.prune.fit import fit_to_budget
from uvclab.uvc import UVCPrimalDual, UVCSettings
from uvclab.vit import latency_build
from uvclab.vit.latency import LatencyTable, fit_calibration
from uvclab.vit.macs import vit_shape

from conftest import small_vit

TINY = dict(width_points=2, mlp_points=2, qk_points=2, rounds=1, iters=1, calibrate=0)  # a table in well under a second


def synthetic_table(shape, seed=0) -> LatencyTable:
    """A table of known random values on the grid of `shape` (no timing)."""
    g = torch.Generator().manual_seed(seed)
    heads, widths = list(range(1, shape.num_heads + 1)), [shape.head_dim // 4 * i for i in range(1, 5)]
    mlp = [shape.mlp_hidden // 4 * i for i in range(1, 5)]
    key = {k: getattr(shape, k) for k in ("embed_dim", "num_heads", "head_dim", "mlp_hidden", "tokens")}
    return LatencyTable(key=key, heads=heads, qk_widths=widths, v_widths=widths,
                        attn_ms=_increasing(torch.rand(len(heads), 4, 4, generator=g)).tolist(), mlp_widths=mlp,
                        mlp_ms=(torch.rand(4, generator=g) + 1).cumsum(0).tolist(), block_overhead_ms=0.1, fixed_ms=0.5,
                        dense_ms=10.0)


def _increasing(x: torch.Tensor) -> torch.Tensor:
    """Positive values increasing along every axis (more heads or width costs more)."""
    for d in range(x.dim()):
        x = x.cumsum(d)
    return x + 0.5


@pytest.fixture
def tiny():
    return small_vit(embed_dim=64, num_heads=4, depth=2)


def test_interpolation_is_exact_on_the_grid_and_linear_between(tiny):
    t = synthetic_table(vit_shape(tiny))
    T = torch.tensor(t.attn_ms)
    for i, h in enumerate(t.heads):
        for j, a in enumerate(t.qk_widths):
            for k, v in enumerate(t.v_widths):
                assert t.attn(torch.tensor(float(h)), torch.tensor(float(a)), torch.tensor(float(v))) == T[i, j, k]
    for i, m in enumerate(t.mlp_widths):
        assert t.mlp(torch.tensor(float(m))) == t.mlp_ms[i]
    # a quarter of the way along each axis: the trilinear mix of the 8 corners; along one axis: linear
    h, a, v = t.heads[1] + 0.25, t.qk_widths[2] + 0.25 * (t.qk_widths[3] - t.qk_widths[2]), float(t.v_widths[0])
    along_h = 0.75 * T[1, 2, 0] + 0.25 * T[2, 2, 0]
    along_a = 0.75 * T[1, 2, 0] + 0.25 * T[1, 3, 0]
    x = t.attn(torch.tensor(h), torch.tensor(float(t.qk_widths[2])), torch.tensor(v))
    torch.testing.assert_close(x, along_h)
    torch.testing.assert_close(t.attn(torch.tensor(float(t.heads[1])), torch.tensor(a), torch.tensor(v)), along_a)
    m = 0.5 * (t.mlp_widths[1] + t.mlp_widths[2])
    torch.testing.assert_close(t.mlp(torch.tensor(m)), torch.tensor(0.5 * (t.mlp_ms[1] + t.mlp_ms[2])))
    w0, w1 = t.mlp_widths[1], t.mlp_widths[2]
    ms = [float(t.mlp(torch.tensor(w0 + f * (w1 - w0)))) for f in (0, .2, .4, .6)]
    steps = [b - a for a, b in zip(ms, ms[1:])]
    assert max(steps) - min(steps) < 1e-5   # equal steps: linear


def test_structure_prediction_matches_the_state_prediction(tiny):
    shape = vit_shape(tiny)
    t = synthetic_table(shape)
    st = uvclab.Structure.dense(tiny)
    st.blocks[0].heads, st.blocks[0].mlp = [0, 2], list(range(32))
    st.blocks[0].qk_dims = [list(range(16))] * 2
    st.blocks[0].v_dims = [list(range(8))] * 2
    st.blocks[1].keep = False
    L, H = shape.depth, shape.num_heads
    s = torch.tensor([[2.0, shape.mlp_hidden - 32], [0.0, 0.0]])
    r = torch.tensor([[8.0] * H, [0.0] * H])
    ms = t.expected_latency(shape, s[:, 0], s[:, 1], r, torch.tensor([[1.0, 0, 1, 0], [1] * 4]),
                            block_gate=torch.tensor([1.0, 0.0]))
    assert float(ms) == pytest.approx(t.structure_ms(st))
    assert t.structure_ms(uvclab.Structure.dense(tiny)) == pytest.approx(t.predicted_dense_ms(L))


def test_calibration_recovers_a_per_block_cost_the_parts_miss():
    model = small_vit(embed_dim=64, num_heads=4, depth=8)
    shape = vit_shape(model)
    t = synthetic_table(shape)
    structs = latency_build.calibration_structures(model, 6, {"v_widths": t.v_widths}, seed=3)
    dense = uvclab.Structure.dense(model)
    assert len({t.parts_ms(s)[1] for s in structs}) > 1  # the number of running blocks varies
    ratios = [t.structure_ms(s) / t.predicted_dense_ms(shape.depth) for s in structs]
    assert min(ratios) < 0.3 and max(ratios) > 0.6  # the structures span the budget range

    # injected whole-model timings: each running block costs 1.5x its parts + 0.8 ms
    def whole(s):
        parts, n = t.parts_ms(s)
        return t.fixed_ms + 1.5 * parts + 0.8 * n
    before = [t.structure_ms(s) / t.predicted_dense_ms(shape.depth) / (whole(s) / whole(dense)) - 1 for s in structs]
    assert max(before) < 0 and min(before) < -0.1  # the uncalibrated table under-predicts the pruned models
    pts = [dense] + structs
    cal = fit_calibration(t, pts, [whole(s) for s in pts])
    assert cal["scale"] == pytest.approx(1.5, rel=1e-3) and cal["block_ms"] == pytest.approx(0.8, rel=1e-2)
    t.calibration = cal
    t.__dict__.pop("_memo", None)
    assert t.predicted_dense_ms(shape.depth) == pytest.approx(whole(dense), rel=1e-3)
    for s in structs:  # now the ratios to dense agree
        assert t.structure_ms(s) / t.predicted_dense_ms(shape.depth) == pytest.approx(whole(s) / whole(dense),
                                                                                      rel=1e-3)
    # one disturbed timing (+40 %) moves the robust fit little; exact timings of the raw table fit identity
    times = [whole(s) for s in pts]
    times[3] *= 1.4
    disturbed = fit_calibration(t, pts, times)
    assert disturbed["scale"] == pytest.approx(1.5, rel=0.1) and disturbed["block_ms"] == pytest.approx(0.8, rel=0.3)
    t.calibration = {"scale": 1.0, "block_ms": 0.0}
    t.__dict__.pop("_memo", None)
    same = fit_calibration(t, pts, [t.structure_ms(s) for s in pts])
    assert same["scale"] == pytest.approx(1, abs=1e-3) and abs(same["block_ms"]) < 1e-3
    with pytest.raises(UvclabError, match="at least three"):
        fit_calibration(t, pts[:2], [1.0, 1.0])


def test_build_with_calibration(tiny):
    t = latency_build.build_table(tiny, batch_size=2, threads=1, progress=False, **{**TINY, "calibrate": 3})
    cal = t.calibration
    assert cal["scale"] > 0 and len(cal["measured_ms"]) == 4 and t.block_overhead_ms >= 0  # dense + 3
    assert all(r > 0 for r in cal["measured_ms"])
    assert t.predicted_dense_ms(2) == pytest.approx(t.fixed_ms + 2 * (cal["scale"] * t.parts_ms(
        uvclab.Structure.dense(tiny))[0] / 2 + cal["block_ms"]))
    assert LatencyTable.from_dict(json.loads(json.dumps(t.to_dict()))).calibration == cal
    assert t.key["calibrate"] == 3  # a calibrated table is cached apart from the plain one
    assert "calibrate" not in latency_build.table_key(tiny, 2, 1, "cpu", latency_build.table_grid(tiny, 2, 2, 2))


def test_calibrated_state_prediction_matches_the_structure_prediction(tiny):
    shape = vit_shape(tiny)
    t = synthetic_table(shape)
    t.calibration = {"scale": 1.3, "block_ms": 0.4}
    st = uvclab.Structure.dense(tiny)
    st.blocks[1].keep = False
    none = torch.zeros(shape.depth)
    ms = t.expected_latency(shape, none, none, torch.zeros(shape.depth, shape.num_heads),
                            torch.ones(shape.depth, shape.num_heads), block_gate=torch.tensor([1.0, 0.0]))
    assert float(ms) == pytest.approx(t.structure_ms(st))
    parts, n = t.parts_ms(st)
    assert t.structure_ms(st) == pytest.approx(t.fixed_ms + 1.3 * parts + 0.4 * n)


def test_gradients_reach_the_counts(tiny):
    gated = uvclab.gate_vit(tiny)
    t = synthetic_table(vit_shape(gated))
    uvc = UVCPrimalDual(gated, UVCSettings(block_skip=False), 0.5, latency=t)
    s = torch.tensor([[1.0, 100.0], [2.0, 40.0]], requires_grad=True)
    r = torch.full((2, 4), 4.0, requires_grad=True)
    R = uvc.expected_macs_ratio(s, r, uvc.scores()[1])
    R.backward()
    assert s.grad is not None and (s.grad != 0).all() and (r.grad != 0).any()
    assert uvc.step(1e-3, 0, warmup=False)["budget_kind"] == "latency"


def test_table_cache_keys_and_invalidation(tiny, tmp_path, monkeypatch):
    t = latency_build.latency_table(tiny, batch_size=2, threads=1, folder=tmp_path, progress=False, **TINY)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and t.key["batch_size"] == 2 and t.key["threads"] == 1
    assert t.key["tokens"] == vit_shape(tiny).tokens and t.key["torch"] == torch.__version__
    assert all(x > 0 for x in t.mlp_ms) and t.fixed_ms > 0 and t.build_seconds > 0

    def no_build(*a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(latency_build, "build_table", no_build)
    again = latency_build.latency_table(tiny, batch_size=2, threads=1, folder=tmp_path, progress=False, **TINY)
    assert again.key == t.key and again.mlp_ms == t.mlp_ms
    with pytest.raises(AssertionError):  # another batch size is another table
        latency_build.latency_table(tiny, batch_size=3, threads=1, folder=tmp_path, progress=False, **TINY)
    monkeypatch.undo()
    d = json.loads(files[0].read_text())
    d["key"]["torch"] = "0.0"  # a table measured under another torch is measured again
    files[0].write_text(json.dumps(d))
    t2 = latency_build.latency_table(tiny, batch_size=2, threads=1, folder=tmp_path, progress=False, **TINY)
    assert t2.key["torch"] == torch.__version__
    files[0].write_text("{not json")  # corrupt: measured again
    assert latency_build.latency_table(tiny, batch_size=2, threads=1, folder=tmp_path, progress=False, **TINY).mlp_ms
    with pytest.raises(UvclabError, match="does not fit"):
        t2.check_shape(vit_shape(small_vit(embed_dim=32, num_heads=4, depth=2)))


def test_fit_to_budget_fits_the_predicted_latency(tiny):
    shape = vit_shape(tiny)
    t = synthetic_table(shape)
    dense = t.predicted_dense_ms(shape.depth)
    g = torch.Generator().manual_seed(1)
    heads, neurons = torch.rand(2, 4, generator=g), torch.rand(2, shape.mlp_hidden, generator=g)
    st = fit_to_budget(shape, uvclab.Structure.dense(tiny), heads, neurons, dense, 0.6, 0.05,
                       block_cost=t.block_ms, fixed_cost=t.fixed_ms)
    assert 0.55 * dense <= t.structure_ms(st) <= 0.6 * dense


def test_budget_config_keys():
    assert load_config(overrides=["budget=0.3"]).macs_ratio == 0.3
    assert load_config(overrides=["budget_kind=latency"]).budget_kind == "latency"
    for bad, msg in ((["budget_kind=ms"], "budget_kind"), (["budget=0.3", "macs_ratio=0.4"], "disagree"),
                     (["budget_kind=latency", "method=magnitude"], "method=uvc")):
        with pytest.raises(UvclabError, match=msg):
            load_config(overrides=bad)


@pytest.mark.slow
def test_latency_budget_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("UVCLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latency_build, "latency_table", partial(latency_build.latency_table, **TINY))
    cfg = load_config(overrides=["budget_kind=latency", "budget=0.6", "latency_batch_size=4", "latency_threads=1",
                                 "warmup_epochs=0", "search_epochs=1", "finetune_epochs=1", "max_steps_per_epoch=3",
                                 "progress=false", "budget_slack=0.1", "select_finetune_steps=2",
                                 "search_resource=latency"])  # R = the table (the default searches on MACs)
    rep = uvclab.compress(cfg, tmp_path / "run")
    assert rep["budget_kind"] == "latency" and rep["latency_ratio_predicted"] <= 0.6
    sel = rep["selection"]  # skip candidates scored on validation, then timed until the export fits
    assert sel["select_skips"] == "validation" and sel["skip_candidates"][0]["skipped"] == []
    rounds = sel["latency_feedback"]
    assert 1 <= len(rounds) <= 1 + cfg.uvc.latency_feedback
    assert rounds[-1]["measured"] <= 0.6 * 1.02 or len(rounds) == 1 + cfg.uvc.latency_feedback
    assert abs(rounds[-1]["predicted"] - rep["latency_ratio_predicted"]) < 1e-9
    assert rep["search_end_latency_ratio"] > 0 and 0 < rep["search_end_macs_ratio"] <= 1  # a noisy table can put R > 1
    for k in ("latency_ratio_measured", "latency_ms", "dense_latency_ms", "latency_ms_predicted"):
        assert rep[k] > 0
    assert list((tmp_path / "cache" / "latency").glob("*.json"))
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("expected_latency_ratio" in r for r in log)


def test_cli_builds_then_reads_the_cached_table(tmp_path, monkeypatch, capsys):
    from uvclab.ui.cli import main
    monkeypatch.setenv("UVCLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(latency_build, "latency_table", partial(latency_build.latency_table, **TINY))
    args = ["latency-table", "deit_tiny_patch16_224", "--img-size", "32", "--model-arg", "patch_size=16",
            "--model-arg", "depth=1", "--batch-size", "1", "--threads", "1"]
    assert main(args + ["--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["key"]["tokens"] == 5 and first["key"]["batch_size"] == 1 and first["build_seconds"] > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(cached)" in out and "dense predicted" in out and "uvc.prune_dims: auto" in out


def proportional_table(shape, v_costs_time: bool) -> LatencyTable:
    """Attention and MLP times exactly proportional to their MACs (1 ms per MAC, no overhead, no fixed part);
    with `v_costs_time` False the attention time ignores v (the MACs of v are free)."""
    N, D = shape.tokens, shape.embed_dim
    heads, widths = list(range(1, shape.num_heads + 1)), [shape.head_dim // 2, shape.head_dim]
    v_eff = (lambda v: v) if v_costs_time else (lambda v: shape.head_dim)
    attn = [[[N * D * h * (2 * a + v_eff(v)) + N * N * h * (a + v_eff(v)) + N * h * v_eff(v) * D for v in widths]
             for a in widths] for h in heads]
    mlp = [shape.mlp_hidden // 2, shape.mlp_hidden]
    key = {k: getattr(shape, k) for k in ("embed_dim", "num_heads", "head_dim", "mlp_hidden", "tokens")}
    key.update(batch_size=4, threads=1, device="cpu")
    return LatencyTable(key=key, heads=heads, qk_widths=widths, v_widths=widths, attn_ms=attn, mlp_widths=mlp,
                        mlp_ms=[2 * N * D * m for m in mlp], block_overhead_ms=0.0, fixed_ms=0.0, dense_ms=1.0)


def test_time_per_mac_and_prune_dims_auto(tiny):
    from dataclasses import replace
    from uvclab.uvc import resolve_prune_dims
    s = vit_shape(tiny)
    pays, free = proportional_table(s, True), proportional_table(s, False)
    assert pays.time_per_mac(s) == pytest.approx({"dims": 1.0, "heads": 1.0, "neurons": 1.0})  # time ~ MACs
    assert free.time_per_mac(s)["dims"] == 0.0                   # v's MACs go, the time stays
    assert free.time_per_mac(s)["neurons"] == pytest.approx(1.0)
    assert pays.time_per_mac(s, "fused")["dims"] == 0.0          # the fused layout pads v back: nothing saved
    auto = replace(UVCSettings(), prune_dims="auto")
    kept, info = resolve_prune_dims(auto, pays, s, "compact")
    assert kept.prune_dims is True and info["prune_dims"] is True and info["dims_vs_other_cuts"] == pytest.approx(1)
    whole, info = resolve_prune_dims(auto, free, s, "compact")
    assert whole.prune_dims is False and info["prune_dims"] is False and info["dims_vs_other_cuts"] == 0.0
    assert info["threshold"] == 0.8
    assert resolve_prune_dims(UVCSettings(), None, s, "compact") == (UVCSettings(), {})  # not auto: untouched
    with pytest.raises(UvclabError, match="needs a latency table"):
        resolve_prune_dims(auto, None, s, "compact")
    with pytest.raises(UvclabError, match="decided from a latency table"):
        UVCPrimalDual(uvclab.gate_vit(tiny), auto, 0.5)
    with pytest.raises(UvclabError, match="prune_dims"):
        UVCSettings(prune_dims="sometimes")
    assert load_config(overrides=["uvc.prune_dims=auto"]).uvc.prune_dims == "auto"


def test_prune_dims_auto_end_to_end(tmp_path, monkeypatch):
    """A MACs budget with `uvc.prune_dims: auto`: the table is built (cached), the decision is in the report, and
    value dims stay whole when the table says they save no time."""
    monkeypatch.setenv("UVCLAB_CACHE", str(tmp_path / "cache"))
    s_free = {}

    def table(model, *a, **k):  # the table of this model, with v's time made free
        s_free["shape"] = vit_shape(model)
        return proportional_table(s_free["shape"], False)
    monkeypatch.setattr(latency_build, "latency_table", table)
    cfg = load_config(overrides=["uvc.prune_dims=auto", "budget=0.6", "warmup_epochs=0", "search_epochs=1",
                                 "finetune_epochs=0", "max_steps_per_epoch=2", "progress=false", "threads=1"])
    rep = uvclab.compress(cfg, tmp_path / "run")
    assert rep["prune_dims_auto"]["prune_dims"] is False and rep["prune_dims_auto"]["dims_vs_other_cuts"] == 0.0
    st = uvclab.Structure.load(tmp_path / "run" / "structure.json")
    assert all(len(d) == s_free["shape"].head_dim for b in st.blocks if b.keep for d in b.v_dims)
    assert rep["budget_kind"] == "macs" and "latency_ratio_measured" in rep
