import math

import pytest
import torch
import torch.nn.functional as F

from uvclab.engine.distill import distillation_loss, hard_kd, soft_kd
from uvclab.errors import UvclabError

S = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])   # student logits (B=2, K=3)
T = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 2.0, 0.0]])   # teacher logits
Y = torch.tensor([0, 2])


def softmax_list(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def kl_by_hand(s, t, tau):
    """sum over the batch of KL(p_t || p_s), in plain Python."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax_list(srow, tau), softmax_list(trow, tau)
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return total


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_kd_matches_hand_computation(tau):
    expected = kl_by_hand(S, T, tau) * tau ** 2 / 2  # batchmean: divide by B
    assert soft_kd(S, T, tau=tau).item() == pytest.approx(expected, rel=1e-5)


def test_numel_reduction_divides_by_classes_too():
    batchmean = soft_kd(S, T, tau=1.0, reduction="batchmean")
    numel = soft_kd(S, T, tau=1.0, reduction="numel")
    assert (batchmean / numel).item() == pytest.approx(S.shape[1], rel=1e-6)


def test_soft_kd_zero_when_equal():
    assert soft_kd(S, S.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_kd_is_ce_to_teacher_argmax():
    # teacher argmax: row 0 -> 0 (first of the tie), row 1 -> 1
    expected = (-math.log(softmax_list(S[0].tolist())[0]) - math.log(softmax_list(S[1].tolist())[1])) / 2
    assert hard_kd(S, T).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_mixes_base_and_kd():
    base = F.cross_entropy(S, Y)
    loss = distillation_loss(S, Y, T, kind="soft", alpha=0.25, tau=2.0)
    torch.testing.assert_close(loss, 0.75 * base + 0.25 * soft_kd(S, T, tau=2.0))
    torch.testing.assert_close(distillation_loss(S, Y, T, kind="hard", alpha=0.5), 0.5 * base + 0.5 * hard_kd(S, T))
    torch.testing.assert_close(distillation_loss(S, Y, None, kind="none"), base)
    smooth = distillation_loss(S, Y, T, kind="soft", alpha=0.0, label_smoothing=0.1)
    torch.testing.assert_close(smooth, F.cross_entropy(S, Y, label_smoothing=0.1))


def test_distilled_tuple_outputs_route_labels_and_kd():
    cls_logits = S.clone().requires_grad_(True)
    dist_logits = (S * 0.5).requires_grad_(True)
    loss = distillation_loss((cls_logits, dist_logits), Y, T, kind="soft", alpha=0.5)
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(S, Y) + 0.5 * soft_kd(S * 0.5, T))
    loss.backward()
    # each head gets only its own term's gradient: labels -> class token, teacher -> distillation token
    manual_cls, manual_dist = S.clone().requires_grad_(True), (S * 0.5).requires_grad_(True)
    (0.5 * F.cross_entropy(manual_cls, Y)).backward()
    (0.5 * soft_kd(manual_dist, T)).backward()
    torch.testing.assert_close(cls_logits.grad, manual_cls.grad)
    torch.testing.assert_close(dist_logits.grad, manual_dist.grad)


def test_real_distilled_model_training_output():
    from uvclab import create_vit
    torch.manual_seed(0)
    model = create_vit("deit_tiny_distilled_patch16_224", img_size=8, patch_size=4, in_chans=1, embed_dim=24,
                       depth=1, num_heads=2, num_classes=3)
    model.set_distilled_training(True)
    out = model.train()(torch.randn(2, 1, 8, 8))
    assert isinstance(out, tuple) and len(out) == 2
    loss = distillation_loss(out, Y, T, kind="hard", alpha=0.5)
    loss.backward()
    assert model.head.weight.grad is not None and model.head_dist.weight.grad is not None


def test_teacher_gets_no_gradient():
    t = T.clone().requires_grad_(True)
    distillation_loss(S.clone().requires_grad_(True), Y, t, kind="soft").backward()
    assert t.grad is None


@pytest.mark.parametrize("kwargs, words", [
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"tau": 0.0}, "tau"),
    ({"kind": "medium"}, "kind"), ({"reduction": "mean"}, "reduction"),
])
def test_bad_arguments_raise_uvclab_error(kwargs, words):
    with pytest.raises(UvclabError, match=words):
        distillation_loss(S, Y, T, **kwargs)


def test_missing_teacher_and_shape_mismatch():
    with pytest.raises(UvclabError, match="teacher_logits"):
        distillation_loss(S, Y, None, kind="soft")
    with pytest.raises(UvclabError, match="num_classes"):
        soft_kd(S, torch.zeros(2, 4))
