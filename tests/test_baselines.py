"""One-shot baselines and the budget fitter's pruning-only / skipping-only modes."""
import pytest
import torch

from conftest import small_vit
from uvclab.baselines import depth_structure, magnitude_scores, magnitude_structure
from uvclab.budget import count, flop_counter_macs, vit_shape
from uvclab.errors import UvclabError
from uvclab.export import export_model
from uvclab.select import fit_to_budget
from uvclab.structure import Structure


@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.3])
def test_magnitude_structure_fits_and_prunes_smallest_groups(ratio):
    m = small_vit()
    st = magnitude_structure(m, ratio)
    dense = count(m)["macs"]
    assert (ratio - 0.02) * dense <= count(m, st)["macs"] <= ratio * dense
    assert all(b.keep for b in st.blocks)
    heads, neurons = magnitude_scores(m)
    # every removed neuron is no larger than the largest kept one would need to be: the removed set's
    # largest score is below the kept set's largest (global ranking, not per layer)
    removed = torch.cat([neurons[l][[i for i in range(neurons.shape[1]) if i not in set(b.mlp)]]
                         for l, b in enumerate(st.blocks)])
    kept = torch.cat([neurons[l][b.mlp] for l, b in enumerate(st.blocks)])
    assert removed.numel() > 0 and removed.median() < kept.median()


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


def test_flop_counter_macs_is_independent_and_agrees_with_calculator():
    m = small_vit()
    assert flop_counter_macs(m) == count(m)["macs"]
    st = magnitude_structure(m, 0.5)
    assert flop_counter_macs(export_model(m, st)) == count(m, st)["macs"]
