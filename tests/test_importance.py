"""Loss-aware group scores ('fisher', 'fisher_norm') and the cubic budget curve of the UVC search (issue 25)."""
import copy

import pytest
import torch
from torch.func import functional_call

from uvclab.errors import UvclabError
from uvclab.uvc.importance import budget_target, mask_gradients
from uvclab.uvc.ops import group_scores, selected_mask
from uvclab.uvc.optimizer import UVCPrimalDual
from uvclab.uvc.settings import UVCSettings
from uvclab.vit.gated import gate_vit

from conftest import small_vit


def _uvc(**kw):
    m = gate_vit(small_vit(depth=2)).train()
    return m, UVCPrimalDual(m, UVCSettings(**kw), 0.5, total_steps=10)


def _backward(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    m.zero_grad(set_to_none=True)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    return x, y


def test_mask_gradient_is_the_derivative_of_a_group_mask():
    """sum(w dL/dw) over a group = dL/dm at m = 1 for m scaling all the group's weights (and biases)."""
    m, _ = _uvc()
    x, y = _backward(m)
    blk, H, Dh = m.blocks[1], m.blocks[1].attn.num_heads, m.blocks[1].attn.head_dim
    dims, heads, neurons = mask_gradients(m.blocks, H, Dh)
    params = dict(m.named_parameters())

    def masked_loss(mask, rows: dict):
        p = dict(params)
        for name, idx_dim in rows.items():
            idx, dim = idx_dim
            scale = torch.ones(p[name].shape[dim]).index_put((idx,), mask.expand(len(idx)))
            p[name] = p[name] * (scale[:, None] if dim == 0 and p[name].dim() == 2 else scale)
        return torch.nn.functional.cross_entropy(functional_call(m, p, (x,)), y)

    one = torch.ones((), requires_grad=True)
    n = 5  # neuron 5 of block 1: fc1 row + bias, fc2 column
    grad_n, = torch.autograd.grad(masked_loss(one, {"blocks.1.mlp.fc1.weight": (torch.tensor([n]), 0),
                                                    "blocks.1.mlp.fc1.bias": (torch.tensor([n]), 0),
                                                    "blocks.1.mlp.fc2.weight": (torch.tensor([n]), 1)}), one)
    torch.testing.assert_close(neurons[1, n], grad_n)
    h = 1  # head 1 of block 1: its q, k, v rows + biases, proj columns
    rows = torch.cat([torch.arange(h * Dh, (h + 1) * Dh) + i * H * Dh for i in range(3)])
    cols = torch.arange(h * Dh, (h + 1) * Dh)
    spec = {"blocks.1.attn.qkv.weight": (rows, 0), "blocks.1.attn.proj.weight": (cols, 1)}
    if blk.attn.qkv.bias is not None:
        spec["blocks.1.attn.qkv.bias"] = (rows, 0)
    grad_h, = torch.autograd.grad(masked_loss(one, spec), one)
    torch.testing.assert_close(heads[1, h], grad_h)
    assert dims.shape == (2, H, Dh) and neurons.shape == (2, blk.mlp.fc1.out_features)


def test_fisher_scores_are_the_bias_corrected_ema_of_squared_mask_gradients():
    m, uvc = _uvc(group_score="fisher", score_ema=0.8)
    assert uvc.fisher.scores() is None
    torch.testing.assert_close(uvc.scores()[2], group_scores(uvc.model.blocks, uvc.shape.num_heads, uvc.shape.head_dim)[2])  # no gradient seen yet: the norms
    _backward(m, 0)
    g1 = mask_gradients(m.blocks, uvc.shape.num_heads, uvc.shape.head_dim)
    uvc.fisher.update()
    torch.testing.assert_close(uvc.scores()[1], g1[1] ** 2)                # one batch: its square exactly
    _backward(m, 1)
    g2 = mask_gradients(m.blocks, uvc.shape.num_heads, uvc.shape.head_dim)
    uvc.fisher.update()
    want = (0.8 * 0.2 * g1[2] ** 2 + 0.2 * g2[2] ** 2) / (1 - 0.8 ** 2)
    torch.testing.assert_close(uvc.scores()[2], want)
    mixed = UVCPrimalDual(m, UVCSettings(group_score="fisher_norm", score_ema=0.8), 0.5)
    mixed.fisher.load_state_dict(uvc.fisher.state_dict())
    torch.testing.assert_close(mixed.scores()[2], (uvc.scores()[2] * group_scores(uvc.model.blocks, uvc.shape.num_heads, uvc.shape.head_dim)[2]).sqrt())


def test_group_without_gradient_scores_zero_and_is_cut_first():
    m, uvc = _uvc(group_score="fisher", block_skip=False)
    _backward(m)
    blk = m.blocks[0]
    n = 7  # a neuron the loss cannot see: zero gradient on its fc1 row, bias and fc2 column
    blk.mlp.fc1.weight.grad[n] = 0
    blk.mlp.fc1.bias.grad[n] = 0
    blk.mlp.fc2.weight.grad[:, n] = 0
    before = blk.mlp.fc2.weight.clone()
    uvc.s[0, 1] = 1.0                        # one neuron of block 0 to cut
    uvc.y[0, 1] = 100.0
    uvc.step(lr=1e-2, epoch=0, warmup=True)  # fisher update, then the prox shrinkage of the selected neuron
    neurons = uvc.scores()[2]
    assert neurons[0, n] == 0 and (neurons[0] > 0).sum() == neurons.shape[1] - 1
    assert selected_mask(neurons[:1], torch.tensor([1.0]))[0].nonzero().flatten().tolist() == [n]
    ratio = blk.mlp.fc2.weight / before
    torch.testing.assert_close(ratio[:, n], torch.full_like(ratio[:, n], 1 / (1 + 2 * 1e-2 * 100)))
    keep = torch.ones(ratio.shape[1], dtype=torch.bool)
    keep[n] = False
    assert (ratio[:, keep] == 1).all()
    from uvclab.uvc.select import current_structure
    assert n not in current_structure(uvc).blocks[0].mlp


def test_resumed_fisher_search_is_bit_identical():
    def run_steps(m, uvc, seeds):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        for k in seeds:
            _backward(m, k)
            opt.step()
            uvc.step(lr=1e-3, epoch=0, warmup=False)

    m, uvc = _uvc(group_score="fisher", block_skip=False)
    run_steps(m, uvc, range(4))
    snap_model, snap_uvc = copy.deepcopy(m.state_dict()), copy.deepcopy(uvc.state_dict())
    assert snap_uvc["fisher"]["n"] == 4
    run_steps(m, uvc, range(4, 8))
    for load_fisher in (True, False):
        m2, uvc2 = _uvc(group_score="fisher", block_skip=False)
        m2.load_state_dict(snap_model)
        sd = dict(snap_uvc)
        if not load_fisher:  # what a resume without the EMA would do: a different search
            uvc2.state.load_state_dict(sd)
            uvc2.gate_opt.load_state_dict(sd["gate_opt"])
        else:
            uvc2.load_state_dict(sd)
        run_steps(m2, uvc2, range(4, 8))
        same = all(torch.equal(a, b) for a, b in zip(uvc.scores(), uvc2.scores()))
        assert same == load_fisher
        if load_fisher:
            for k in ("s", "r", "y", "p", "z"):
                assert torch.equal(getattr(uvc, k), getattr(uvc2, k)), k


def test_cubic_budget_curve_is_monotone_and_lands_on_budget():
    B, total, frac = 0.3, 100, 0.5
    cubic = [budget_target(t, total, B, frac, "cubic") for t in range(total + 1)]
    linear = [budget_target(t, total, B, frac, "linear") for t in range(total + 1)]
    assert cubic[0] == 1.0 and linear[0] == 1.0
    assert all(a >= b for a, b in zip(cubic, cubic[1:]))                 # never rises
    assert cubic[50] == B and all(c == B for c in cubic[50:])            # B at the end of its window, then held
    assert cubic[25] == pytest.approx(B + (1 - B) * 0.125)               # (1 - 1/2)^3
    assert all(c < l for c, l in zip(cubic[1:50], linear[1:50]))         # ahead of the linear walk inside it
    assert linear[25] == pytest.approx(1 - 0.7 * 0.5) and linear[50] == pytest.approx(B)  # as before issue 25
    assert budget_target(10, total, B, 0.0, "cubic") == B                # no schedule: B from the start
    m, uvc = _uvc(budget_curve="cubic", budget_schedule=0.5)
    uvc.state.search_step = 3
    assert uvc.target() == pytest.approx(0.5 + 0.5 * (1 - 3 / 5) ** 3)


def test_bad_new_settings_are_refused():
    with pytest.raises(UvclabError, match="group_score"):
        UVCSettings(group_score="taylor2")
    with pytest.raises(UvclabError, match="budget_curve"):
        UVCSettings(budget_curve="exp")
    with pytest.raises(UvclabError, match="score_ema"):
        UVCSettings(score_ema=1.0)
