"""One-shot baselines and the budget fitter's pruning-only / skipping-only modes."""
import pytest
import torch

from conftest import small_vit
from uvclab.prune.baselines import depth_structure, magnitude_scores, magnitude_structure
from uvclab.vit.macs import count, flop_counter_macs, vit_shape
from uvclab.errors import UvclabError
from uvclab.vit.export import export_model
from uvclab.prune.fit import fit_to_budget
from uvclab.vit.structure import Structure


@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.3])
def test_magnitude_structure_fits_and_prunes_smallest_groups(ratio):
    m = small_vit()
    st = magnitude_structure(m, ratio)
    dense = count(m)["macs"]
    assert (ratio - 0.02) * dense <= count(m, st)["macs"] <= ratio * dense
    assert all(b.keep for b in st.blocks)


def test_magnitude_ranks_globally_not_per_layer():
    """Block 0's MLP made 10x larger: a global ranking keeps (nearly) all of it and cuts the other blocks
    instead; a per-layer ranking would keep the same fraction everywhere."""
    m = small_vit()
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight.mul_(10)
        m.blocks[0].mlp.fc2.weight.mul_(10)
    st = magnitude_structure(m, 0.5)
    kept = [len(b.mlp) / m.blocks[0].mlp.fc1.out_features for b in st.blocks]
    assert kept[0] == 1.0 and max(kept[1:]) < 0.9, kept
    heads, neurons = magnitude_scores(m)
    removed = torch.cat([neurons[l][[i for i in range(neurons.shape[1]) if i not in set(b.mlp)]]
                         for l, b in enumerate(st.blocks)])
    kept_scores = torch.cat([neurons[l][b.mlp] for l, b in enumerate(st.blocks)])
    assert removed.max() <= kept_scores.max()


def test_magnitude_scores_follow_the_weights():
    m = small_vit()
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight[5] *= 10
    _, neurons = magnitude_scores(m)
    assert neurons[0].argmax().item() == 5


def test_depth_structure_greedy_uses_the_score():
    m = small_vit()
    # a score that prefers dropping block 1 first, then block 2
    st = depth_structure(m, 0.55, score=lambda s: 10 * (not s.blocks[1].keep) + (not s.blocks[2].keep))
    assert [b.keep for b in st.blocks] == [True, False, False, True]
    assert count(m, st)["macs"] <= 0.55 * count(m)["macs"]
    assert [b.keep for b in depth_structure(m, 0.55).blocks] == [True, True, False, False]


def test_fit_to_budget_skip_only_and_prune_only():
    m = small_vit()
    s, dense = vit_shape(m), count(m)["macs"]
    heads, neurons = magnitude_scores(m)
    keep_prob = torch.tensor([0.9, 0.1, 0.8, 0.2])
    with pytest.warns(UserWarning, match="too coarse"):
        st = fit_to_budget(s, Structure.dense(m), heads, neurons, dense, 0.6, keep_prob=keep_prob, allow_prune=False)
    assert [b.keep for b in st.blocks] == [True, False, True, False]          # least wanted blocks dropped
    assert all(len(b.heads) == s.num_heads and len(b.mlp) == s.mlp_hidden for b in st.blocks)
    st = fit_to_budget(s, Structure.dense(m), heads, neurons, dense, 0.4, keep_prob=keep_prob, allow_skip=False)
    assert all(b.keep for b in st.blocks) and count(m, st)["macs"] <= 0.4 * dense
    with pytest.raises(UvclabError, match="allow block skipping"):
        fit_to_budget(s, Structure.dense(m), heads, neurons, dense, 0.05, allow_skip=False)


def _random_scores(seed: int):
    """A small ViT's shape and random (dims, heads, neurons) scores, with zero head / neuron counts."""
    m = small_vit()
    s = vit_shape(m)
    torch.manual_seed(seed)
    scores = torch.rand(s.depth, s.num_heads, s.head_dim), torch.rand(s.depth, s.num_heads), \
        torch.rand(s.depth, s.mlp_hidden)
    return m, s, scores, torch.zeros(s.depth, 2)


def test_structure_from_counts_rounds_value_dims_to_a_multiple():
    from uvclab.uvc.select import structure_from_counts
    m, s, (dims, heads, neurons), counts = _random_scores(0)
    L, H, Dh = s.depth, s.num_heads, s.head_dim
    removed = torch.tensor([1.0, 3.0, Dh / 2 - 1, Dh - 1])[:, None].expand(L, H)    # per block
    exact = structure_from_counts(s, dims, heads, neurons, counts, removed, torch.ones(L, dtype=torch.bool))
    rounded = structure_from_counts(s, dims, heads, neurons, counts, removed, torch.ones(L, dtype=torch.bool),
                                    dims_multiple=8)
    assert [len(b.v_dims[0]) for b in exact.blocks] == [Dh - 1, Dh - 3, Dh // 2 + 1, 1]
    want = [min(Dh, max(8, 8 * round((Dh - k) / 8))) for k in (1, 3, Dh // 2 - 1, Dh - 1)]
    assert [len(b.v_dims[0]) for b in rounded.blocks] == want and all(w % 8 == 0 or w == Dh for w in want)
    for b_exact, b_round in zip(exact.blocks, rounded.blocks):   # rounding keeps the highest-scoring dims
        small, large = sorted([b_exact.v_dims[0], b_round.v_dims[0]], key=len)
        assert set(small) <= set(large)


def test_shared_head_width_pads_nothing_and_keeps_each_heads_best_dims():
    from uvclab.uvc.select import structure_from_counts
    from uvclab.vit.macs import expected_macs
    m, s, (dims, heads, neurons), counts = _random_scores(1)
    L, H, Dh = s.depth, s.num_heads, s.head_dim
    removed = torch.stack([torch.arange(H, dtype=torch.float) * (Dh // H)] * L)       # unequal widths per head
    keep = torch.ones(L, dtype=torch.bool)
    apart = structure_from_counts(s, dims, heads, neurons, counts, removed, keep)
    shared = structure_from_counts(s, dims, heads, neurons, counts, removed, keep, share_head_width=True)
    mean_width = round(sum(Dh - k for k in removed[0].tolist()) / H)
    for b, l in zip(shared.blocks, range(L)):
        assert {len(d) for d in b.v_dims} == {mean_width}
        for h, d in zip(b.heads, b.v_dims):                      # each head keeps its own highest-scoring dims
            assert d == sorted(dims[l, h].topk(mean_width).indices.tolist())
    # the search counts exactly these value widths: with one width per layer the export pads nothing
    exact = expected_macs(s, counts[:, 0], counts[:, 1], removed, torch.ones(L, H)).item()
    assert count(m, shared)["macs"] <= count(m, apart)["macs"]
    assert abs(count(m, shared)["macs"] - exact) <= L * s.tokens * (s.tokens + s.embed_dim)  # one dim of rounding


def test_flop_counter_macs_is_independent_and_agrees_with_calculator():
    m = small_vit()
    assert flop_counter_macs(m) == count(m)["macs"]
    st = magnitude_structure(m, 0.5)
    assert flop_counter_macs(export_model(m, st)) == count(m, st)["macs"]
