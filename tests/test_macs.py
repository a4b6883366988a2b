import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import uvclab
from uvclab.vit import macs as budget
from uvclab.errors import UvclabError
from uvclab.vit.structure import Structure

from conftest import random_structure, small_vit

PAPER_MACS = {"deit_tiny_patch16_224": 1_253_683_200, "deit_small_patch16_224": 4_598_882_304,
              "deit_base_patch16_224": 17_563_828_224}


def counter_macs(model, x) -> int:
    with uvclab.explicit_attention(model), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("name", list(PAPER_MACS))
def test_dense_macs_match_paper_and_flop_counter(name):
    with torch.device("meta"):
        m = uvclab.create_vit(name).eval()
        x = torch.empty(1, 3, 224, 224)
        measured = counter_macs(m, x)
    c = budget.count(m)
    assert c["macs"] == PAPER_MACS[name] == measured
    assert c["params"] == sum(p.numel() for p in m.parameters())


def test_distilled_model_counts_both_heads():
    with torch.device("meta"):
        m = uvclab.create_vit("deit_tiny_distilled_patch16_224")
        assert budget.count(m)["macs"] == counter_macs(m, torch.empty(1, 3, 224, 224))
    assert budget.vit_shape(m).num_prefix == 2


def test_reference_block_counts_from_method_doc():
    # Method doc 2.3: DeiT-Tiny keeping 5 of 12 blocks leaves 43.0 % of the MACs.
    with torch.device("meta"):
        m = uvclab.create_vit("deit_tiny_patch16_224")
    s = Structure.dense(m)
    for b in s.blocks[5:]:
        b.keep = False
    assert budget.count(m, s)["macs"] / budget.count(m)["macs"] == pytest.approx(0.430, abs=5e-4)


@pytest.mark.parametrize("layout", budget.LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structure_macs_equal_counter_on_exported_model(layout, seed):
    m = small_vit()
    s = random_structure(m, seed)
    e = uvclab.export_model(m, s, layout)
    c = budget.count(m, s, layout)
    assert c["macs"] == counter_macs(e, torch.randn(1, 3, 32, 32))
    assert c["params"] == sum(p.numel() for p in e.parameters())


def test_table_sums_to_total_and_has_components():
    m = small_vit()
    t = budget.macs_table(m)
    assert set(t.component) >= {"stem", "qkv", "q@k", "attn@v", "proj", "fc1", "fc2", "head"}
    assert t.macs.sum() == budget.count(m)["macs"]


def _uvc_state(m, heads_removed, neurons_removed, dims_removed):
    s = budget.vit_shape(m)
    L, H = s.depth, s.num_heads
    hr = torch.full((L,), float(heads_removed), requires_grad=True)
    nr = torch.full((L,), float(neurons_removed), requires_grad=True)
    dr = torch.full((L, H), float(dims_removed), requires_grad=True)
    kept = torch.zeros(L, H)
    kept[:, : H - heads_removed] = 1
    return s, hr, nr, dr, kept


def test_exact_expected_macs_equal_structure_macs():
    m = small_vit()
    s, hr, nr, dr, kept = _uvc_state(m, 2, 500, 16)
    st = Structure.dense(m)
    for b in st.blocks:
        b.heads = b.heads[:4]
        b.qk_dims = b.qk_dims[:4]
        b.v_dims = [d[:48] for d in b.v_dims[:4]]
        b.mlp = b.mlp[:1036]
    exact = budget.expected_macs(s, hr, nr, dr, kept, formula="exact")
    assert int(exact.item()) == budget.count(m, st, "compact")["macs"]
    exact.backward()
    assert (hr.grad < 0).all() and (nr.grad < 0).all() and (dr.grad[:, :4] < 0).all()
    assert (dr.grad[:, 4:] == 0).all()  # r of a removed head does not count


def test_reference_formula_matches_method_doc_and_is_conservative():
    m = small_vit()
    s, hr, nr, dr, kept = _uvc_state(m, 2, 500, 16)
    ref = budget.expected_macs(s, hr, nr, dr, kept, formula="reference")
    exact = budget.expected_macs(s, hr, nr, dr, kept, formula="exact")
    N, D, H, Dh, M = s.tokens, s.embed_dim, s.num_heads, s.head_dim, s.mlp_hidden
    hk, mk, rho = (H - 2) / H, (M - 500) / M, (D - 2 * Dh - 4 * 16) / D
    per_block = 3 * N * D * D * hk + N * N * D * hk + (N * N * D + N * D * D) * rho + 2 * N * D * M * mk
    assert ref.item() == pytest.approx(s.stem_macs + s.head_macs + s.depth * per_block, rel=1e-6)
    assert ref.item() >= exact.item()  # qkv and q.k scale with heads only: overestimates, never under


def test_gates_scale_expected_macs():
    m = small_vit()
    s, hr, nr, dr, kept = _uvc_state(m, 0, 0, 0)
    g = torch.zeros(s.depth, requires_grad=True)
    r = budget.expected_macs(s, hr, nr, dr, kept, block_gate=g)
    assert r.item() == s.stem_macs + s.head_macs
    r.backward()
    assert (g.grad > 0).all()


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval_rejected(bad):
    with pytest.raises(UvclabError, match=r"outside \(0, 1\]"):
        budget.check_budget(bad)
