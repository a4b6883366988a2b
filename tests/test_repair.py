"""Closed-form repair (mean, lstsq), calibration batches and the activation structure: exact answers.

Pruned channels that are exact copies of kept ones are recovered exactly by lstsq, constant ones by mean;
repair never changes shapes (export, save, load, ONNX, MACs); two gloo ranks get identical weights; the
memory limit and an ill-conditioned Gram say what happened."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import uvclab
from uvclab.errors import UvclabError
from uvclab.prune.activation import activation_structure
from uvclab.prune.baselines import magnitude_structure
from uvclab.prune.calibration import CalibrationSettings, calibration_batches
from uvclab.prune.repair import kept_inputs, repair, ridge_refit
from uvclab.vit.export import export_model, load_pruned, save_pruned
from uvclab.vit.gated import gate_vit
from uvclab.vit.structure import Structure, apply_structure


TINY = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=2, embed_dim=48, num_heads=3)


def tiny(depth=2, seed=0):
    torch.manual_seed(seed)
    return gate_vit(uvclab.create_vit("deit_tiny_patch16_224", **dict(TINY, depth=depth)).eval())


def images(n=48, seed=1):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def batches(n=48, size=16, seed=1):
    x = images(n, seed)
    return [x[i:i + size] for i in range(0, n, size)]


def cut(model) -> Structure:
    """Block by block: head 2 pruned, head 1 keeps v dims 0..9 of 16, neurons 96.. of 192 pruned."""
    s = Structure.dense(model)
    for b in s.blocks:
        b.heads, b.qk_dims = [0, 1], [list(range(16))] * 2
        b.v_dims = [list(range(16)), list(range(10))]
        b.mlp = list(range(96))
    return s


@torch.no_grad()
def make_copies(model):
    """Pruned channels = exact copies of kept ones: head 2 = head 0 (q, k, v), v dims 10..15 of head 1 = its
    v dims 0..5, neuron 96 + i = neuron i."""
    D, Dh = 48, 16
    for blk in model.blocks:
        W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        for part in range(3):
            o = part * D
            W[o + 2 * Dh:o + 3 * Dh], b[o + 2 * Dh:o + 3 * Dh] = W[o:o + Dh], b[o:o + Dh]
        v = 2 * D + Dh  # head 1's v rows
        W[v + 10:v + 16], b[v + 10:v + 16] = W[v:v + 6], b[v:v + 6]
        blk.mlp.fc1.weight[96:], blk.mlp.fc1.bias[96:] = blk.mlp.fc1.weight[:96], blk.mlp.fc1.bias[:96]


@torch.no_grad()
def make_constants(model):
    """Pruned channels are constant: head 2 and head 1's v dims 10..15 read a constant v (zero v rows, a
    bias), neurons 96.. a constant GELU(bias) (zero fc1 rows)."""
    D, Dh = 48, 16
    for blk in model.blocks:
        W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        for rows in (slice(2 * D + 2 * Dh, 3 * D), slice(2 * D + Dh + 10, 2 * D + 2 * Dh)):
            W[rows] = 0
            b[rows] = torch.linspace(-1, 1, b[rows].numel())
        blk.mlp.fc1.weight[96:] = 0
        blk.mlp.fc1.bias[96:] = torch.linspace(-2, 2, 96)


def test_lstsq_recovers_pruned_channels_that_copy_kept_ones():
    m = tiny()
    make_copies(m)
    x = images(8, seed=5)
    with torch.no_grad():
        dense = m(x)
    s = cut(m)
    with torch.no_grad():
        assert (apply_structure(copy.deepcopy(m), s)(x) - dense).abs().max() > 0.05  # the cut alone hurts
    rep = repair(m, s, batches(), "lstsq", CalibrationSettings(ridge=1e-10), samples=48)
    assert rep["layers"] == 4 and rep["samples"] == 48 and rep["ridge_fallbacks"] == {"attn": 0, "mlp": 0}
    with torch.no_grad():
        torch.testing.assert_close(export_model(m, s)(x), dense, atol=1e-5, rtol=0)
        torch.testing.assert_close(apply_structure(m, s)(x), dense, atol=1e-5, rtol=0)


def test_mean_recovers_constant_pruned_channels_and_lstsq_too():
    m = tiny()
    make_constants(m)
    x = images(8, seed=5)
    with torch.no_grad():
        dense = m(x)
    s = cut(m)
    for kind in ("mean", "lstsq"):
        r = copy.deepcopy(m)
        repair(r, s, batches(), kind, CalibrationSettings(ridge=1e-10))
        with torch.no_grad():
            torch.testing.assert_close(export_model(r, s)(x), dense, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_repair_changes_weights_never_shapes_and_leaves_unpruned_layers_alone(tmp_path):
    pytest.importorskip("onnxruntime")
    from uvclab.compare.deploy import export_onnx
    from uvclab.vit.macs import count
    m = tiny(depth=4)
    from conftest import random_structure  # here, not at the top: the gloo test's spawned workers import this
    s = random_structure(m, seed=3)       # block 1 skipped, block 2 attention off, block 3 MLP off
    s.blocks[0].mlp = list(range(192))    # nothing pruned in block 0's MLP
    before = copy.deepcopy(m.state_dict())
    rep = repair(m, s, batches(), "lstsq")
    after = m.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    expect = {f"blocks.{l}.{'attn.proj' if kind == 'attn' else 'mlp.fc2'}.{p}"
              for (l, kind) in kept_inputs(s) for p in ("weight", "bias")}
    assert changed == expect and rep["layers"] == len(kept_inputs(s))
    assert not any(k.startswith(("blocks.1.", "blocks.2.attn", "blocks.3.mlp", "blocks.0.mlp")) for k in changed)
    e = export_model(m, s)
    assert count(e) == count(m, s)
    save_pruned(e, tmp_path / "model")
    loaded = load_pruned(tmp_path / "model")
    x = images(4, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), e(x))
        torch.testing.assert_close(e(x), apply_structure(m, s)(x), atol=1e-5, rtol=0)
    res = export_onnx(loaded, tmp_path / "m.onnx", images=x)
    assert res.max_abs_diff <= 1e-4


def test_none_is_a_no_op_and_bad_kind_is_an_error():
    m = tiny()
    before = copy.deepcopy(m.state_dict())
    assert repair(m, cut(m), batches(), "none")["layers"] == 0
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(UvclabError, match="not one of"):
        repair(m, cut(m), batches(), "ols")


def test_memory_limit_is_a_clear_error_before_any_work():
    m = tiny()
    with pytest.raises(UvclabError, match=r"max_gram_mb=0.01.*repair=mean"):
        repair(m, cut(m), batches(), "lstsq", CalibrationSettings(max_gram_mb=0.01))
    repair(m, cut(m), batches(), "mean", CalibrationSettings(max_gram_mb=0.01))  # mean needs no Gram


def test_ill_conditioned_gram_falls_back_to_a_larger_ridge_and_says_so():
    m = tiny()
    make_copies(m)
    with torch.no_grad():  # kept neurons 1 and 0 are identical: the kept Gram is singular
        for blk in m.blocks:
            blk.mlp.fc1.weight[1], blk.mlp.fc1.bias[1] = blk.mlp.fc1.weight[0], blk.mlp.fc1.bias[0]
    rep = repair(m, cut(m), batches(), "lstsq", CalibrationSettings(ridge=0.0))
    assert rep["ridge_fallbacks"]["mlp"] == 2 and set(rep["ridge_used"]) >= {"0.mlp", "1.mlp"}
    assert all(r >= 1e-9 for r in rep["ridge_used"].values())
    # a Gram of nothing (no calibration tokens): no ridge rescues it
    with pytest.raises(UvclabError, match="singular"):
        ridge_refit(torch.randn(3, 4), torch.zeros(3), torch.zeros(5, 5, dtype=torch.float64), [0, 1], 0.0)


def test_ridge_refit_closed_form():
    """Against numpy-free brute force: the normal equations of the regularised problem hold."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g, dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(200, 1, dtype=torch.float64)], 1)
    W, b = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    kept, ridge = [0, 2, 3], 1e-2
    Wk, bk, used = ridge_refit(W, b, Xa.t() @ Xa, kept, ridge)
    G = Xa.t() @ Xa
    lam = ridge * G.diagonal()[kept].mean()
    Xk = Xa[:, kept + [5]]
    resid = Xk @ torch.cat([Wk, bk[:, None]], 1).double().t() - Xa @ torch.cat([W, b[:, None]], 1).double().t()
    grad = Xk.t() @ resid + lam * torch.cat([(Wk - W[:, kept]).double(), torch.zeros(3, 1, dtype=torch.float64)], 1).t()
    # float32 weights: the normal equations hold to float32 rounding of sums over 200 rows (G's scale ~200)
    assert used == ridge and grad.abs().max() < 1e-5 * G.abs().max()


def _rank_worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = tiny()
    data = torch.utils.data.TensorDataset(images(40, seed=2), torch.zeros(40, dtype=torch.long))
    b, n = calibration_batches(data, 40, 8, seed=3)
    rep = repair(m, cut(m), b, "lstsq", samples=n)
    torch.save({"state": m.state_dict(), "images": sum(len(x) for x, _ in b), "report": rep}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_get_identical_weights_equal_to_one_process(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["images"] + r1["images"] == 40 and r0["images"] == 20 and r0["report"]["samples"] == 40
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    m = tiny()   # one process, all 40 images: the same weights up to summation order
    data = torch.utils.data.TensorDataset(images(40, seed=2), torch.zeros(40, dtype=torch.long))
    repair(m, cut(m), calibration_batches(data, 40, 8, seed=3)[0], "lstsq")
    for k, v in m.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, atol=1e-5, rtol=1e-5)


def test_calibration_batches_are_seeded_capped_and_leave_the_global_rng_alone():
    data = torch.utils.data.TensorDataset(torch.arange(30.0)[:, None], torch.arange(30))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    b1, n1 = calibration_batches(data, 100, 8, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    b2, _ = calibration_batches(data, 100, 8, seed=4)
    b3, n3 = calibration_batches(data, 12, 8, seed=5)
    assert n1 == 30 and n3 == 12 and [len(y) for _, y in b1] == [8, 8, 8, 6]
    assert sorted(torch.cat([y for _, y in b1]).tolist()) == list(range(30))
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(b1, b2))
    assert not torch.equal(b1[0][1], b3[0][1][:8]) and len(torch.cat([y for _, y in b3])) == 12
    with pytest.raises(UvclabError):
        CalibrationSettings(samples=0)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_activation_structure_fits_the_budget_and_follows_activations_not_weights(ratio):
    from uvclab.vit.macs import count
    m = tiny(depth=4)
    loud = list(range(0, 192, 2))
    with torch.no_grad():  # even neurons: tiny fc1 weights (magnitude drops them) but a large constant output
        for blk in m.blocks:
            blk.mlp.fc1.weight[loud] *= 0.01
            blk.mlp.fc1.bias[loud] = 4.0
    act = activation_structure(m, ratio, batches())
    mag = magnitude_structure(m, ratio)
    frac = count(m, act)["macs"] / count(m)["macs"]
    assert ratio - 0.02 <= frac <= ratio
    kept_loud = lambda s: sum(len(set(b.mlp) & set(loud)) for b in s.blocks)  # noqa: E731
    assert kept_loud(act) > 2 * kept_loud(mag)


def test_config_keys_repair_and_calibration(tmp_path):
    from uvclab.engine.config import CompressConfig, load_config
    (tmp_path / "c.yaml").write_text("repair: lstsq\ncalibration:\n  ridge: 1e-2\n")
    cfg = load_config(tmp_path / "c.yaml", ["calibration.samples=500"])
    assert cfg.calibration == CalibrationSettings(repair="lstsq", samples=500, ridge=0.01)  # flat `repair` maps in
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg and CompressConfig().calibration.repair == "none"
    for bad, msg in (("repair=ols", "repair='ols' is not one of"), ("calibration.samples=0", "samples=0 must be"),
                     ("calibration.ridge=-1", "ridge=-1.0 must be >= 0"), ("calibration.seed=1", r"Unknown config key\(s\) \[.calibration.seed.\]")):
        with pytest.raises(UvclabError, match=msg):
            load_config(overrides=[bad])
