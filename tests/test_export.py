import json

import pytest
import torch

import uvclab
from uvclab.prune.baselines import depth_structure, uniform_structure
from uvclab.compare.throughput import compare_throughput
from uvclab.errors import UvclabError
from uvclab.vit.export import export_model, load_pruned, save_pruned
from uvclab.vit.structure import Structure, apply_structure

from conftest import random_structure, small_vit


@pytest.mark.parametrize("layout", ["fused", "compact"])
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("seed", [0, 1])
def test_export_equals_masked_gated_model(name, layout, seed):
    m = small_vit(name)
    s = random_structure(m, seed)
    x = torch.randn(4, 3, 32, 32)
    e = export_model(m, s, layout)
    masked = apply_structure(m, s)
    assert (e(x) - masked(x)).abs().max() < 1e-4
    assert len(e.blocks) == sum(b.keep and (b.runs_attn or b.runs_mlp) for b in s.blocks)


def test_export_of_dense_structure_equals_model_and_is_not_aliased():
    m = small_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    e = export_model(m, Structure.dense(m))
    torch.testing.assert_close(e(x), ref)
    with torch.no_grad():
        e.head.weight.zero_()
    torch.testing.assert_close(m(x), ref)  # the export owns its weights


def test_save_load_bit_identical(tmp_path):
    m = small_vit()
    e = export_model(m, random_structure(m), "compact")
    save_pruned(e, tmp_path / "exp")
    loaded = load_pruned(tmp_path / "exp")
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), e(x))
    card = json.loads((tmp_path / "exp" / "uvclab.json").read_text())
    assert card["uvclab_version"] == uvclab.__version__ and card["layout"] == "compact"
    assert card["macs"] == uvclab.count(m, random_structure(m), "compact")["macs"]
    assert loaded.training is False


def test_load_errors(tmp_path):
    with pytest.raises(UvclabError, match="not an exported uvclab model"):
        load_pruned(tmp_path)
    m = small_vit()
    save_pruned(export_model(m, random_structure(m)), tmp_path / "a")
    w = tmp_path / "a" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UvclabError, match="corrupt or truncated"):
        load_pruned(tmp_path / "a")
    save_pruned(export_model(m, random_structure(m)), tmp_path / "b")
    (tmp_path / "b" / "uvclab.json").write_text('{"model": ')
    with pytest.raises(UvclabError, match="corrupt or truncated"):
        load_pruned(tmp_path / "b")
    save_pruned(export_model(m, random_structure(m, seed=0)), tmp_path / "c")
    save_pruned(export_model(m, random_structure(m, seed=5)), tmp_path / "d")
    (tmp_path / "c" / "model.safetensors").write_bytes((tmp_path / "d" / "model.safetensors").read_bytes())
    with pytest.raises(UvclabError, match="does not match"):
        load_pruned(tmp_path / "c")


def test_save_needs_exported_model(tmp_path):
    with pytest.raises(UvclabError, match="export_model"):
        save_pruned(small_vit(), tmp_path)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_baseline_structures_within_budget(ratio):
    m = small_vit(depth=6)
    dense = uvclab.count(m)["macs"]
    for s in (uniform_structure(m, ratio), depth_structure(m, ratio)):
        assert uvclab.count(m, s)["macs"] <= ratio * dense


def test_bench_takes_the_median_of_alternating_rounds(monkeypatch):
    """Timings are injected: the result must be the median round of each model, timed in alternation, and
    MACs counted from the models themselves (FlopCounterMode agrees)."""
    from uvclab.compare import throughput
    from uvclab.vit import latency_build
    from uvclab.vit.macs import flop_counter_macs
    m = small_vit(depth=2)
    e = export_model(m, uniform_structure(m, 0.5))
    clock, calls = [0.0], []
    seconds = {"d": iter([9.0, 2.0, 4.0, 3.0]), "e": iter([9.0, 1.0, 3.0, 0.5])}  # per call; the first: warm-up
    monkeypatch.setattr(latency_build.time, "perf_counter", lambda: clock[0])

    def on_a_fake_clock(fns, *args, **kw):  # the shared timer (time_calls), each call advancing the clock
        def call(name):
            calls.append(name)
            clock[0] += next(seconds[name])
        return latency_build.time_calls([lambda: call("d"), lambda: call("e")], *args, **kw)
    monkeypatch.setattr(throughput, "time_calls", on_a_fake_clock)
    r = compare_throughput(m, e, batch_size=4, rounds=3, iters=1, warmup=1)
    assert calls == ["d", "e", "d", "e", "e", "d", "d", "e"]          # warm-up, then rounds in alternating order
    assert r.dense_img_per_s == pytest.approx(4 / 3.0) and r.exported_img_per_s == pytest.approx(4 / 1.0)
    assert r.speedup == pytest.approx(3.0)
    assert r.dense_macs == flop_counter_macs(m) and r.exported_macs == flop_counter_macs(e)
    assert r.efficiency == pytest.approx(3.0 * r.exported_macs / r.dense_macs)


def test_bench_measures_a_much_smaller_model_as_faster():
    m = small_vit(depth=6)
    e = export_model(m, depth_structure(m, 0.2))                    # 1 of 6 blocks left: ~5x fewer MACs
    r = compare_throughput(m, e, batch_size=32, rounds=5, iters=2, warmup=1)
    assert r.speedup > 1.5, r


def test_count_works_on_exported_and_reloaded_models(tmp_path):
    m = small_vit()
    s = random_structure(m, 3)
    e = export_model(m, s, "compact")
    assert uvclab.count(e) == uvclab.count(m, s, "compact")
    assert uvclab.count(load_pruned(save_pruned(e, tmp_path / "e")))["macs"] == uvclab.count(m, s, "compact")["macs"]
    with pytest.raises(UvclabError, match="already exported"):
        uvclab.count(e, s)
