"""What did compression change? `compare_runs(a, b)` compares two models' behaviour on the test split.

Each side is a finished run folder or `"teacher"` (the teacher the other run was distilled from). The result
holds the per-class accuracy of each and the delta, both confusion matrices and their delta (ConfusionFlow,
Hinterreiter et al., TVCG 2020), the agreement rate, the flipped predictions (right -> wrong and wrong ->
right, with their images), the mean KL divergence between the two output distributions, and the structure
difference per block (what one keeps that the other drops). This is the behaviour comparison of Compress and
Compare (Boggust et al., IEEE VIS 2024), over uvclab's run folders. Predictions are cached by
`uvclab.compare.predictions` (computed once per model and split).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from uvclab.compare.predictions import Side, resolve_pair, side_test_split, test_logits
from uvclab.vit.structure import Structure


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def confusion(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


@dataclass
class Comparison:
    """Two models on the same test images. Arrays are indexed by test-split position."""
    a: Side
    b: Side
    labels: np.ndarray                      # (N,) true classes
    class_names: list[str]
    logits_a: np.ndarray                    # (N, C)
    logits_b: np.ndarray
    structure_a: Optional[Structure] = None
    structure_b: Optional[Structure] = None
    _test: object = field(default=None, repr=False)

    # ---- predictions --------------------------------------------------------------------------
    @property
    def pred_a(self) -> np.ndarray:
        return self.logits_a.argmax(1)

    @property
    def pred_b(self) -> np.ndarray:
        return self.logits_b.argmax(1)

    @property
    def prob_a(self) -> np.ndarray:
        return np.exp(log_softmax(self.logits_a))

    @property
    def prob_b(self) -> np.ndarray:
        return np.exp(log_softmax(self.logits_b))

    @property
    def top1_a(self) -> float:
        return 100.0 * float((self.pred_a == self.labels).mean())

    @property
    def top1_b(self) -> float:
        return 100.0 * float((self.pred_b == self.labels).mean())

    @property
    def agreement(self) -> float:
        """Fraction of test images on which both predict the same class."""
        return float((self.pred_a == self.pred_b).mean())

    @property
    def mean_kl(self) -> float:
        """Mean over test images of KL(p_a || p_b) in nats: how far b's output distribution moved from a's."""
        la, lb = log_softmax(self.logits_a), log_softmax(self.logits_b)
        return float((np.exp(la) * (la - lb)).sum(1).mean())

    # ---- per class and confusion ---------------------------------------------------------------
    @property
    def per_class(self) -> pd.DataFrame:
        """One row per class: images, accuracy (%) of a and b, delta = b - a (points), sorted as the labels."""
        C = len(self.class_names)
        n = np.bincount(self.labels, minlength=C)
        hit = lambda p: np.bincount(self.labels[p == self.labels], minlength=C)  # noqa: E731
        acc_a = 100.0 * hit(self.pred_a) / np.maximum(n, 1)
        acc_b = 100.0 * hit(self.pred_b) / np.maximum(n, 1)
        return pd.DataFrame({"class": self.class_names, "images": n, "acc_a": acc_a, "acc_b": acc_b,
                             "delta": acc_b - acc_a}).set_index("class")

    @property
    def confusion_a(self) -> np.ndarray:
        return confusion(self.labels, self.pred_a, len(self.class_names))

    @property
    def confusion_b(self) -> np.ndarray:
        return confusion(self.labels, self.pred_b, len(self.class_names))

    @property
    def confusion_delta(self) -> np.ndarray:
        """confusion_b - confusion_a: positive off-diagonal cells are confusions b makes more often."""
        return self.confusion_b - self.confusion_a

    # ---- flipped predictions -------------------------------------------------------------------
    @property
    def right_to_wrong(self) -> np.ndarray:
        """Test indices a classifies correctly and b does not."""
        return np.flatnonzero((self.pred_a == self.labels) & (self.pred_b != self.labels))

    @property
    def wrong_to_right(self) -> np.ndarray:
        """Test indices b classifies correctly and a does not."""
        return np.flatnonzero((self.pred_a != self.labels) & (self.pred_b == self.labels))

    def flipped(self, kind: str = "right_to_wrong", limit: Optional[int] = None) -> pd.DataFrame:
        """The flipped examples of one kind, most confident b first: index, true class, both predictions
        and the probability each side gives its prediction."""
        idx = getattr(self, kind)
        pa, pb = self.prob_a[idx], self.prob_b[idx]
        df = pd.DataFrame({"index": idx, "label": [self.class_names[i] for i in self.labels[idx]],
                           "pred_a": [self.class_names[i] for i in self.pred_a[idx]],
                           "pred_b": [self.class_names[i] for i in self.pred_b[idx]],
                           "conf_a": pa.max(1) if len(idx) else [], "conf_b": pb.max(1) if len(idx) else []})
        df = df.sort_values("conf_b", ascending=False, kind="stable").reset_index(drop=True)
        return df if limit is None else df.head(limit)

    def images(self, indices) -> np.ndarray:
        """Test images for display, values in [0, 1]: (n, H, W) for grey images, (n, H, W, 3) for colour."""
        return np.stack([display_image(self._test, int(i)) for i in indices]) if len(indices) else np.zeros((0, 1, 1))

    # ---- structure -----------------------------------------------------------------------------
    @property
    def structure_diff(self) -> Optional[pd.DataFrame]:
        return structure_diff(self.structure_a, self.structure_b)

    def summary(self) -> dict:
        """The headline numbers: both top-1 (%), agreement, mean KL, counts of flipped examples."""
        return {"a": self.a.label, "b": self.b.label, "images": len(self.labels), "top1_a": self.top1_a,
                "top1_b": self.top1_b, "agreement": self.agreement, "mean_kl": self.mean_kl,
                "right_to_wrong": len(self.right_to_wrong), "wrong_to_right": len(self.wrong_to_right)}


def display_image(dataset, i: int) -> np.ndarray:
    """Image i of a test dataset in [0, 1] for display: the stored pixels of in-memory data (digits,
    Fashion-MNIST), else the normalized tensor rescaled to [0, 1]."""
    if hasattr(dataset, "images"):
        x = dataset.images[i]
        x = x.float() if x.dtype.is_floating_point else x.float() / 255
        x = x.numpy()
    else:
        x = dataset[i][0].numpy()
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)


def structure_diff(a: Optional[Structure], b: Optional[Structure]) -> Optional[pd.DataFrame]:
    """Per block: heads, value dims and MLP neurons kept by both, only by a, only by b (indices refer to the
    dense model); whether each side runs the block. None when the structures come from different dense shapes."""
    if a is None or b is None or (a.num_heads, a.head_dim, a.mlp_hidden, a.depth) != (
            b.num_heads, b.head_dim, b.mlp_hidden, b.depth):
        return None
    rows = []
    for l, (ba, bb) in enumerate(zip(a.blocks, b.blocks)):
        ha = set(ba.heads) if ba.runs_attn else set()
        hb = set(bb.heads) if bb.runs_attn else set()
        va = {(h, d) for h, dims in zip(ba.heads, ba.v_dims) for d in dims} if ba.runs_attn else set()
        vb = {(h, d) for h, dims in zip(bb.heads, bb.v_dims) for d in dims} if bb.runs_attn else set()
        ma = set(ba.mlp) if ba.runs_mlp else set()
        mb = set(bb.mlp) if bb.runs_mlp else set()
        rows.append({"block": l, "runs_a": ba.keep, "runs_b": bb.keep,
                     "heads_both": len(ha & hb), "heads_only_a": len(ha - hb), "heads_only_b": len(hb - ha),
                     "v_dims_both": len(va & vb), "v_dims_only_a": len(va - vb), "v_dims_only_b": len(vb - va),
                     "mlp_both": len(ma & mb), "mlp_only_a": len(ma - mb), "mlp_only_b": len(mb - ma)})
    df = pd.DataFrame(rows).set_index("block")
    df.attrs.update(num_heads=a.num_heads, head_dim=a.head_dim, mlp_hidden=a.mlp_hidden)
    return df


def flip_confidence(c: Comparison, low_quantile: float = 0.25) -> dict:
    """Are the images B gets wrong where A was right the ones A was unsure of? (A is usually the teacher.)

    Over the images A classifies correctly: A's confidence (its top probability) on the flipped ones
    (right -> wrong) against all of them; the share of flips among A's least confident `low_quantile` of these
    images and the flip rate there and elsewhere; and the AUROC of low A confidence as a predictor of a flip
    (0.5: unrelated, 1: every flip is less confident than every kept image)."""
    from sklearn.metrics import roc_auc_score
    right = c.pred_a == c.labels
    conf = c.prob_a.max(1)[right]
    flipped = (c.pred_b != c.labels)[right]
    low = conf <= np.quantile(conf, low_quantile)
    both = 0 < flipped.sum() < len(flipped)
    return {"a_right": int(right.sum()), "flipped": int(flipped.sum()),
            "median_conf_flipped": float(np.median(conf[flipped])) if flipped.any() else float("nan"),
            "median_conf_a_right": float(np.median(conf)),
            "share_of_flips_in_low": float(flipped[low].sum() / max(flipped.sum(), 1)),
            "flip_rate_low": float(flipped[low].mean()), "flip_rate_rest": float(flipped[~low].mean()),
            "auroc_low_conf": float(roc_auc_score(flipped, -conf)) if both else float("nan"),
            "low_quantile": low_quantile}


def compare_runs(a, b="teacher", max_samples: Optional[int] = None) -> Comparison:
    """Compare two models on the test split: each of `a`, `b` is a finished run folder or 'teacher' (the
    teacher of the other side's run; a teacher card path also works). `max_samples`: only the first N test
    images (None: all). Raises UvclabError for runs on different datasets, splits or label sets, or a run
    folder without an exported model."""
    sa, sb = resolve_pair(a, b)
    test, labels, names = side_test_split(sa)
    la, lb = test_logits(sa, max_samples), test_logits(sb, max_samples)
    return Comparison(sa, sb, labels[:len(la)], names, la, lb, sa.structure(), sb.structure(), _test=test)
