"""The Torch-Pruning baseline: heads and MLP neurons pruned to a MACs budget, embedding width kept."""
import copy

import pytest
import timm
import torch

pytest.importorskip("torch_pruning")

from uvclab.errors import UvclabError  # noqa: E402
from uvclab.vit.macs import flop_counter_macs  # noqa: E402
from uvclab.prune.tp import torch_pruning_to_budget  # noqa: E402


def tiny_vit(depth=2, num_heads=3, embed_dim=48):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, num_classes=10).eval()


def calib(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def pruned(model):
    before = copy.deepcopy(model.state_dict())
    out = {r: torch_pruning_to_budget(model, r, calib()) for r in (0.7, 0.5, 0.3)}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [b.attn.num_heads for b in model.blocks] == [3, 3] and model.blocks[0].mlp.fc1.out_features == 192
    return out


@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.3])
def test_fits_budget_closely(model, pruned, ratio):
    p, dense = pruned[ratio], flop_counter_macs(model)
    macs = flop_counter_macs(p, (1, 8, 8))
    assert p.uvclab_tp["dense_macs"] == dense and p.uvclab_tp["macs"] == macs
    assert (ratio - 0.05) * dense <= macs <= ratio * dense
    assert p.uvclab_tp["macs_ratio"] == pytest.approx(macs / dense) and 0 < p.uvclab_tp["steps"] <= 40


@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.3])
def test_prunes_heads_and_neurons_not_the_embedding(model, pruned, ratio):
    p = pruned[ratio]
    assert tuple(p(torch.randn(5, 1, 8, 8)).shape) == (5, 10)
    D = model.embed_dim
    assert p.patch_embed.proj.out_channels == D and p.cls_token.shape[-1] == D and p.pos_embed.shape[-1] == D
    assert p.norm.weight.shape == (D,) and p.head.weight.shape == (10, D)
    for blk in p.blocks:
        a, head_dim = blk.attn, model.blocks[0].attn.head_dim
        assert a.head_dim == head_dim and 1 <= a.num_heads <= 3
        assert a.qkv.weight.shape == (3 * a.num_heads * head_dim, D) and a.proj.weight.shape == (D, a.num_heads * head_dim)
        assert blk.norm1.weight.shape == blk.norm2.weight.shape == (D,)
        assert blk.mlp.fc1.in_features == D and blk.mlp.fc2.out_features == D
        assert 1 <= blk.mlp.fc1.out_features == blk.mlp.fc2.in_features < 192
    if ratio == 0.3:
        assert any(blk.attn.num_heads < 3 for blk in p.blocks)


def test_prune_embed_and_custom_loss():
    m = tiny_vit()
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        return torch.nn.functional.cross_entropy(out, y)
    p = torch_pruning_to_budget(m, 0.4, calib(1), prune_embed=True, loss_fn=loss_fn, input_shape=(1, 1, 8, 8))
    D = p.patch_embed.proj.out_channels
    assert D < 48 and p.pos_embed.shape[-1] == D and p.head.in_features == D
    assert p.uvclab_tp["macs"] <= 0.4 * p.uvclab_tp["dense_macs"] and len(calls) == p.uvclab_tp["steps"]
    assert tuple(p(torch.randn(2, 1, 8, 8)).shape) == (2, 10)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.2])
def test_bad_budget(model, ratio):
    with pytest.raises(UvclabError, match="outside"):
        torch_pruning_to_budget(model, ratio, calib(1))


def test_unreachable_budget_and_no_batches(model):
    with pytest.raises(UvclabError, match="cannot reach"):
        torch_pruning_to_budget(model, 0.01, calib(1), iterative_steps=5)
    with pytest.raises(UvclabError, match="calibration batch"):
        torch_pruning_to_budget(model, 0.5, [])


@pytest.mark.parametrize("ratio", [0.7, 0.3])
def test_kept_structure_exports_the_same_model(model, pruned, ratio):
    """The Torch-Pruning result as a uvclab Structure: exporting the dense model with it gives the pruned
    model's outputs and MACs (so the baseline is saved and loaded like every other method)."""
    import uvclab
    from uvclab.prune.tp import kept_structure
    st = kept_structure(model, pruned[ratio])
    slim = uvclab.export_model(model, st, "compact")
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(slim(x), pruned[ratio](x), rtol=1e-4, atol=1e-5)
    assert uvclab.count(model, st, "compact")["macs"] == flop_counter_macs(pruned[ratio]) == flop_counter_macs(slim)
    assert [len(b.heads) for b in st.blocks] == [blk.attn.num_heads for blk in pruned[ratio].blocks]


def test_isomorphic_pruning_ranks_within_group_kinds(model):
    iso = torch_pruning_to_budget(model, 0.5, calib(), isomorphic=True)
    assert flop_counter_macs(iso) <= 0.5 * flop_counter_macs(model)
    assert sum(b.mlp.fc1.out_features for b in iso.blocks) < sum(b.mlp.fc1.out_features for b in model.blocks)
