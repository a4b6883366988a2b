"""Knowledge-distillation losses, as pure functions of logits (DeiT `losses.py`, reused by UVC `utils/losses.py`).

`loss = (1 - alpha) * CE(student, labels) + alpha * KD(student, teacher)` with
soft KD = KL(softmax(t / tau) || softmax(s / tau)) * tau^2, and hard KD = CE(s, argmax t).
The reference divides the summed KL by `logits.numel()` (B x classes): on ImageNet that makes the term about
1000x weaker than a per-sample KL. `reduction="numel"` reproduces it; the default "batchmean" divides by B.
A DeiT distilled student in training mode returns `(cls_logits, dist_logits)`: the label loss trains the
class token, KD trains the distillation token (method doc section 4). `kd_loss_fn` closes over a student and
its teacher for the training loop. With Mixup/CutMix the labels are soft (B, K) targets and `criterion` is
timm's SoftTargetCrossEntropy; the teacher gets the same mixed images (4.1).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from uvclab.errors import UvclabError

KINDS = ("soft", "hard", "none")
REDUCTIONS = ("batchmean", "numel")
Logits = Union[torch.Tensor, tuple]


def soft_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """tau^2 * sum KL(p_t || p_s) over the batch, divided by B ("batchmean") or B x classes ("numel")."""
    _check_tau_reduction(tau, reduction)
    _check_shapes(student_logits, teacher_logits)
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                  reduction="sum", log_target=True)
    denom = student_logits.shape[0] if reduction == "batchmean" else student_logits.numel()
    return kl * (tau * tau) / denom


def hard_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's top-1 class (DeiT hard distillation)."""
    _check_shapes(student_logits, teacher_logits)
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def distillation_loss(outputs: Logits, labels: torch.Tensor, teacher_logits: Optional[Logits] = None,
                      kind: str = "soft", alpha: float = 0.5, tau: float = 1.0, reduction: str = "batchmean",
                      label_smoothing: float = 0.0, criterion: Optional[Callable] = None) -> torch.Tensor:
    """(1 - alpha) * CE(outputs, labels) + alpha * KD; `kind="none"` is the plain CE.

    outputs: (B, K) logits, or (cls_logits, dist_logits) from a DeiT distilled model in training mode.
    labels: (B,) class indices or (B, K) soft targets (Mixup/CutMix). teacher_logits: (B, K); a teacher
    tuple is averaged like timm's inference. criterion(logits, labels): the label loss in place of CE (the
    recipe's SoftTargetCrossEntropy / LabelSmoothingCrossEntropy; `label_smoothing` then does not apply).
    """
    if kind not in KINDS:
        raise UvclabError(f"Unknown distillation kind '{kind}'; choose one of {KINDS}.")
    if not 0.0 <= alpha <= 1.0:
        raise UvclabError(f"alpha={alpha} must be in [0, 1] (the weight of the distillation term).")
    _check_tau_reduction(tau, reduction)
    cls_logits, kd_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
    base = (F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing) if criterion is None
            else criterion(cls_logits, labels))
    if kind == "none":
        return base
    if teacher_logits is None:
        raise UvclabError(f"kind='{kind}' needs teacher_logits; pass them or use kind='none'.")
    if isinstance(teacher_logits, (tuple, list)):
        teacher_logits = (teacher_logits[0] + teacher_logits[1]) / 2
    teacher_logits = teacher_logits.detach()
    kd = soft_kd(kd_logits, teacher_logits, tau, reduction) if kind == "soft" else hard_kd(kd_logits, teacher_logits)
    return (1 - alpha) * base + alpha * kd


def _check_tau_reduction(tau: float, reduction: str) -> None:
    if not tau > 0:
        raise UvclabError(f"tau={tau} must be > 0 (the softmax temperature).")
    if reduction not in REDUCTIONS:
        raise UvclabError(f"Unknown KD reduction '{reduction}'; choose one of {REDUCTIONS}.")


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise UvclabError(f"Student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
                          "the teacher must be trained on the same classes (num_classes) as the student.")


def kd_loss_fn(model: torch.nn.Module, teacher: torch.nn.Module, kind: str = "soft", alpha: float = 0.5,
               tau: float = 1.0, reduction: str = "batchmean", criterion=None):
    """loss(x, y): the distillation loss of `model` against the frozen `teacher` (config kd, kd_alpha, ...), on
    the same x (with Mixup, `Recipe.wrap_loss` mixes x before this runs). criterion: the label loss (None: CE)."""
    def loss(x, y):
        with torch.no_grad():
            t = teacher(x)
        return distillation_loss(model(x), y, t, kind=kind, alpha=alpha, tau=tau, reduction=reduction,
                                 criterion=criterion)
    return loss
