
import pytest
import torch

from uvclab.vit.gated import gate_vit
from uvclab.uvc.optimizer import UVCPrimalDual
from uvclab.uvc.ops import least_sum, projected_sgd, selected_mask, ste_ceil
from uvclab.uvc.settings import REFERENCE_UVC, UVCSettings

from conftest import small_vit


def test_ste_ceil_forward_ceil_backward_identity():
    x = torch.tensor([0.2, 1.0, 2.7], requires_grad=True)
    y = ste_ceil(x)
    assert y.tolist() == [1.0, 1.0, 3.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_least_sum_value_and_next_smallest_gradient():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [4.0, 4.0, 1.0, 0.5]])
    k = torch.tensor([2.0, 0.0], requires_grad=True)
    v = least_sum(scores, k)
    assert v.tolist() == [3.0, 0.0]                   # 1+2 ; nothing
    v.sum().backward()
    assert k.grad.tolist() == [3.0, 0.5]              # the 3rd smallest ; the smallest


def test_selected_mask_picks_smallest():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0]])
    assert selected_mask(scores, torch.tensor([2.0])).tolist() == [[0, 1, 0, 1]]
    assert selected_mask(scores, torch.tensor([1.0]), largest=True).tolist() == [[1, 0, 1, 1]]


def test_projected_sgd_respects_box_and_clips():
    x = torch.tensor([0.0, 5.0, 2.0])
    up = torch.tensor(5.0)
    new = projected_sgd(x, torch.tensor([1.0, -1.0, -10.0]), up, lr=0.5)
    # at 0 a positive grad is blocked, at the top a negative one; inf-norm clip scales -10 to -1
    assert new.tolist() == [0.0, 5.0, 2.5]


def _uvc(macs_ratio=0.5, **kw):
    m = gate_vit(small_vit(depth=4))
    return m, UVCPrimalDual(m, UVCSettings(**kw), macs_ratio)


def test_proximal_step_shrinks_only_selected_groups():
    m, uvc = _uvc()
    uvc.s[:, 1] = 10  # 10 smallest neurons of every block selected
    uvc.y[:, 1] = 100.0
    _, _, neurons = uvc.scores()
    before = [b.mlp.fc2.weight.clone() for b in m.blocks]
    uvc.proximal_step(lr=1e-2)
    for l, b in enumerate(m.blocks):
        sel = selected_mask(neurons[l:l + 1], torch.tensor([10.0]))[0].bool()
        ratio = b.mlp.fc2.weight / before[l]
        torch.testing.assert_close(ratio[:, sel], torch.full_like(ratio[:, sel], 1 / (1 + 2 * 1e-2 * 100)))
        torch.testing.assert_close(ratio[:, ~sel], torch.ones_like(ratio[:, ~sel]))
        assert torch.equal(b.attn.proj.weight, m.blocks[l].attn.proj.weight)


def test_z_rises_while_over_budget_and_falls_back():
    m, uvc = _uvc(macs_ratio=0.5, prune=False, block_skip=False, dual_update="ascent", zlr=1.0, budget_schedule=0)
    z = [float(uvc.z)]
    for _ in range(3):
        uvc.step(lr=1e-4, epoch=0, warmup=False)  # nothing can move: R = 1 > 0.5
        z.append(float(uvc.z))
    assert z[1] > z[0] and z[2] > z[1] and z[3] == pytest.approx(z[0] + 3 * 0.5)
    uvc.budget = 1.0
    uvc.s[:, 1] = 500  # now under budget: R < 1
    for _ in range(10):
        uvc.step(lr=1e-4, epoch=0, warmup=False)
    assert float(uvc.z) < z[3] and float(uvc.z) >= 0


def test_counts_and_gates_move_toward_budget():
    torch.manual_seed(0)
    m, uvc = _uvc(macs_ratio=0.5, gating_interval=5, ylr=1e-5)
    ratios = []
    for _ in range(150):
        uvc.set_model_gates(uvc.gate_sample())
        m(torch.randn(2, 3, 32, 32)).sum().backward()  # a task gradient reaches alpha through the gates
        ratios.append(uvc.step(lr=1e-4, epoch=0, warmup=False)["expected_macs_ratio"])
    assert ratios[0] > 0.85 and min(ratios) < 0.7  # starts at P(keep) = softmax([-1, 1])[1] = 0.88
    assert (uvc.s > 0).any() and (uvc.r > 0).any()
    assert (uvc.y >= 0).all() and (uvc.p >= 0).all() and uvc.z >= 0


def test_budget_schedule_and_importance_counts_settle_at_budget():
    torch.manual_seed(0)
    m = gate_vit(small_vit(depth=4))
    uvc = UVCPrimalDual(m, UVCSettings(block_skip=False), 0.5, total_steps=200)
    assert uvc.target() == 1.0
    recs = [uvc.step(lr=1e-4, epoch=0, warmup=False) for _ in range(200)]
    assert recs[49]["target"] == pytest.approx(0.75, abs=0.01) and recs[-1]["target"] == 0.5
    last = [r["expected_macs_ratio"] for r in recs[-30:]]  # settled at B (no final fit needed), no swing
    assert abs(sum(last) / len(last) - 0.5) < 0.01 and all(abs(x - 0.5) < 0.03 for x in last)
    assert (uvc.r == uvc.r[:, :1]).all()                    # tied dims: one value width per layer
    ref = UVCPrimalDual(m, UVCSettings(**REFERENCE_UVC), 0.5, total_steps=200)
    assert ref.target() == 0.5


def test_reference_settings_reproduce_the_reference_optimiser_choices():
    ref = UVCSettings(**REFERENCE_UVC)
    assert (ref.group_score, ref.count_grad, ref.dual_update, ref.budget_schedule, ref.tie_dims) == \
        ("proj", "dual", "ascent", 0.0, False)
    assert (ref.zlr, ref.count_lr) == (1.0, 0.02)


def test_warmup_moves_nothing_but_weights_prox():
    m, uvc = _uvc()
    rec = uvc.step(lr=1e-4, epoch=0, warmup=True)
    assert rec["warmup"] and float(uvc.z) == pytest.approx(1e-3) and (uvc.s == 0).all()
    assert uvc.gate_sample(warmup=True) is None  # our default: warm-up does not perturb the model
    _, uvc_ref = _uvc(warmup_gate=0.5)
    assert uvc_ref.gate_sample(warmup=True).tolist() == [0.5] * 4


def test_state_dict_round_trip():
    m, uvc = _uvc(gating_interval=3)
    for _ in range(4):
        uvc.step(lr=1e-4, epoch=0, warmup=False)
    m2, uvc2 = _uvc(gating_interval=3)
    uvc2.load_state_dict(uvc.state_dict())
    for k in ("s", "r", "y", "p", "z"):
        assert torch.equal(getattr(uvc, k), getattr(uvc2, k))
    assert torch.equal(uvc.alpha, uvc2.alpha) and uvc2.global_step == 4


def test_nupi_update_matches_cooper_optim():
    """Our few lines of nuPI against cooper-optim's optimizer (Ki = 1, maximize, projected to z >= 0)."""
    cooper = pytest.importorskip("cooper")
    from uvclab.uvc.ops import nupi_error
    lr, kp, nu = 0.2, 10.0, 0.5
    errors = [0.3, 0.25, 0.1, -0.05, -0.2, -0.1, 0.02, 0.0, 0.04, -0.01]
    lam = torch.nn.Parameter(torch.tensor(0.001))
    opt = cooper.optim.nuPI([lam], lr=lr, Kp=torch.tensor(kp), Ki=torch.tensor(1.0), ema_nu=nu, maximize=True)
    z, xi = torch.tensor(0.001), torch.tensor(0.0)
    for t, e in enumerate(errors):
        lam.grad = torch.tensor(e)
        opt.step()
        with torch.no_grad():
            lam.clamp_(min=0)
        e_pi, xi = nupi_error(torch.tensor(e), xi, kp, nu, first=t == 0)
        z = (z + lr * e_pi).clamp_min(0)
        assert float(z) == pytest.approx(float(lam.detach()), abs=1e-6), t


def test_pi_controller_settles_where_ascent_overshoots():
    """A toy resource R that follows z with a lag: plain ascent overshoots the budget and rings, nuPI settles."""
    from uvclab.uvc.ops import nupi_error

    def run(pi: bool):
        z, xi, R, trace = torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), []
        for t in range(300):
            R = R + 0.1 * ((1.0 - 0.8 * z.clamp(max=1.25)) - R)       # the counts chase the price z, lagged
            e = R - 0.5
            if pi:
                e, xi = nupi_error(e, xi, 10.0, 0.5, first=t == 0)
            z = (z + 0.1 * e).clamp_min(0)
            trace.append(float(R))
        return trace
    ascent, pi = run(False), run(True)
    assert min(ascent) < 0.45 and min(pi) > 0.49              # ascent undershoots the budget, PI does not
    assert abs(pi[-1] - 0.5) < 0.01
