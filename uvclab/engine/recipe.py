"""The training recipe of timm's train.py / DeiT, built from timm rather than rewritten.

`RecipeSettings` names each knob as timm's train.py does (`aa`, `reprob`, `color_jitter`, `mixup`, `cutmix`,
`mixup_prob`, `mixup_switch_prob`, `smoothing`, `model_ema_decay`); every default is off, so a run without them
is the run uvclab made before. `build_recipe` turns them into `timm.data.Mixup`, the label loss
(`timm.loss.SoftTargetCrossEntropy` with Mixup/CutMix, `LabelSmoothingCrossEntropy` with smoothing only) and
`timm.utils.ModelEmaV3`; `with_train_transform` swaps in `timm.data.create_transform` for RGB image data.
With distillation the teacher sees the mixed batch the student sees (DeiT `losses.py`; method doc section 4.1).
"""
from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from uvclab.errors import UvclabError


@dataclass(frozen=True)
class RecipeSettings:
    """One stage's recipe; the comments give timm train.py's default and DeiT's value."""
    aa: Optional[str] = None             # RandAugment policy (timm --aa; DeiT: rand-m9-mstd0.5-inc1); RGB data only
    reprob: float = 0.0                  # random-erasing probability, mode 'pixel' (timm 0; DeiT 0.25)
    color_jitter: float = 0.0            # colour-jitter strength (timm 0.4, ignored by timm with RandAugment); RGB only
    train_interpolation: str = "bicubic"  # resize interpolation of the timm transform (DeiT: bicubic)
    mixup: float = 0.0                   # Mixup alpha, active if > 0 (timm 0; DeiT and UVC: 0.8)
    cutmix: float = 0.0                  # CutMix alpha, active if > 0 (timm 0; DeiT and UVC: 1.0)
    mixup_prob: float = 1.0              # probability of mixing a batch (timm and DeiT 1.0; UVC's code 0.8)
    mixup_switch_prob: float = 0.5       # probability of CutMix instead of Mixup when both are on (timm 0.5)
    smoothing: float = 0.0               # label smoothing (timm 0.1; DeiT and UVC 0.1), inside Mixup's targets
    model_ema_decay: Optional[float] = None  # weight EMA decay (timm --model-ema-decay 0.9998; DeiT 0.99996);
                                         # None: off. Stage 2 validates and keeps the EMA weights when on
    finetune: dict = dataclasses.field(default_factory=dict)  # stage 2's own values of these keys (e.g. {aa:
                                         # rand-m9-mstd0.5-inc1, reprob: 0.25}); empty: stage 2 = stage 1

    def __post_init__(self):
        if self.finetune:
            self.for_finetune()  # a bad stage-2 key or value is an error now, not at stage 2
        for name in ("reprob", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UvclabError(f"recipe {name}={getattr(self, name)} must be a probability in [0, 1].")
        for name in ("mixup", "cutmix", "color_jitter"):
            if getattr(self, name) < 0:
                raise UvclabError(f"recipe {name}={getattr(self, name)} must be >= 0 (0: off).")
        if not 0.0 <= self.smoothing < 1.0:
            raise UvclabError(f"recipe smoothing={self.smoothing} must be in [0, 1).")
        if self.model_ema_decay is not None and not 0.0 < self.model_ema_decay < 1.0:
            raise UvclabError(f"recipe model_ema_decay={self.model_ema_decay} must be in (0, 1), or null for no EMA.")
        if self.aa is not None and not str(self.aa).startswith(("rand", "augmix", "original", "v0", "3a")):
            raise UvclabError(f"recipe aa='{self.aa}' is not a timm auto-augment policy; use e.g. "
                              "'rand-m9-mstd0.5-inc1' (RandAugment, DeiT) or null.")

    def for_finetune(self) -> "RecipeSettings":
        """Stage 2's recipe: these settings with `finetune`'s keys overriding."""
        unknown = sorted(k for k in self.finetune if k not in RECIPE_KEYS or k == "finetune")
        if unknown:
            raise UvclabError(f"Unknown recipe.finetune key(s) {unknown}. Known: {sorted(RECIPE_KEYS[:-1])}.")
        return dataclasses.replace(self, **self.finetune, finetune={})

    @property
    def mixing(self) -> bool:
        """Mixup or CutMix on: targets become (B, K) soft labels."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def image_ops(self) -> bool:
        """Augmentations that replace the dataset's training transform."""
        return self.aa is not None or self.reprob > 0 or self.color_jitter > 0


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(RecipeSettings))


# ---- data: the training transform ------------------------------------------------------------------

def train_transform(s: RecipeSettings, img_size: int, mean, std):
    """timm's training transform (RandomResizedCrop + flip [+ RandAugment / colour jitter] + normalise [+ erasing])
    for PIL RGB images: DeiT's `build_transform(is_train=True)`."""
    from timm.data import create_transform
    return create_transform(img_size, is_training=True, auto_augment=s.aa, re_prob=s.reprob, re_mode="pixel",
                            re_count=1, color_jitter=s.color_jitter or None, interpolation=s.train_interpolation,
                            mean=tuple(mean), std=tuple(std))


class _Erasing(torch.utils.data.Dataset):
    """Random erasing (timm `RandomErasing`, per image) on a dataset of normalised (C, H, W) tensors."""

    def __init__(self, dataset, prob: float):
        from timm.data.random_erasing import RandomErasing
        self.dataset, self.erase = dataset, RandomErasing(prob, mode="pixel", device="cpu")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return self.erase(x.clone()), y


def with_train_transform(splits, s: RecipeSettings):
    """`splits` with the training split's augmentation replaced by the recipe's (validation and test untouched).

    ImageFolder and CIFAR (PIL RGB images): timm's `create_transform` at the split's img_size, with the mean/std
    the split already normalises with. In-memory grey tensors (digits, fashion_mnist): only random erasing
    applies (on the normalised tensor, after the dataset's own crop/flip); RandAugment and colour jitter need
    RGB PIL images and are refused. Mixup/CutMix, smoothing and EMA work on every dataset (`build_recipe`)."""
    if not s.image_ops:
        return splits
    train = splits.train
    base = getattr(train, "dataset", None)
    tf = getattr(base, "transform", None)
    if isinstance(train, torch.utils.data.Subset) and tf is not None and hasattr(tf, "transforms"):
        norm = tf.transforms[-1]  # data._transforms ends with Normalize(mean, std)
        base = copy.copy(base)
        base.transform = train_transform(s, splits.img_size, norm.mean, norm.std)
        return dataclasses.replace(splits, train=torch.utils.data.Subset(base, train.indices))
    if s.aa is not None or s.color_jitter > 0:
        raise UvclabError(f"aa (RandAugment) and color_jitter need RGB images (imagefolder, cifar10/100); "
                          f"{splits.name} is a grey tensor dataset. Drop them (--set aa=null --set color_jitter=0) "
                          "and use mixup / cutmix / smoothing / reprob / model_ema_decay, which apply to it.")
    return dataclasses.replace(splits, train=_Erasing(train, s.reprob))


# ---- the step: Mixup, label loss, EMA --------------------------------------------------------------

@dataclass
class Recipe:
    """A stage's stateful recipe parts. `mixup` (None: off) mixes (x, y) -> (mixed x, (B, K) soft targets);
    `criterion(logits, targets)` is the label loss (None: plain cross-entropy); `ema` averages the weights."""
    settings: RecipeSettings
    mixup: Optional[object] = None
    criterion: Optional[Callable] = None
    ema: Optional[object] = None

    def wrap_loss(self, loss_fn: Callable) -> Callable:
        """loss(x, y) that mixes the batch first: student and teacher inside `loss_fn` both see the mixed x."""
        if self.mixup is None:
            return loss_fn

        def mixed(x, y):
            if len(x) % 2:
                raise UvclabError(f"Mixup/CutMix mix a batch with its reverse and need an even batch, got {len(x)}; "
                                  "use an even batch_size.")
            x, y = self.mixup(x, y)
            return loss_fn(x, y)
        return mixed

    def after_step(self, model: torch.nn.Module) -> None:
        """EMA update after the optimiser step (timm train.py order)."""
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The weights a stage validates and keeps: the EMA copy when on."""
        return self.ema.module if self.ema is not None else model

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume bit-identically: the numpy / python RNG states (Mixup, RandAugment
        and random erasing draw from them; torch's is checkpointed by the stage) and the EMA weights."""
        out = {"rng": host_rng_state()}
        if self.ema is not None:
            out["ema"] = self.ema.module.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        set_host_rng_state(state["rng"])
        if self.ema is not None:
            if "ema" not in state:
                raise UvclabError("The checkpoint has no EMA weights but model_ema_decay is set; resume with the "
                                  "run's own config.yaml (or start a fresh run).")
            self.ema.module.load_state_dict(state["ema"])


def build_recipe(s: RecipeSettings, num_classes: int, model: Optional[torch.nn.Module] = None) -> Recipe:
    """timm's Mixup, label loss and ModelEmaV3 for these settings (EMA only when `model` is given)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup = criterion = ema = None
    if s.mixing:
        from timm.data import Mixup
        mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, prob=s.mixup_prob, switch_prob=s.mixup_switch_prob,
                      mode="batch", label_smoothing=s.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()  # smoothing is already in Mixup's targets
    elif s.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(s.smoothing)
    if s.model_ema_decay is not None and model is not None:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=s.model_ema_decay)
    return Recipe(s, mixup, criterion, ema)


# ---- host RNG states (checkpointable with torch.load(weights_only=True)) ---------------------------

def host_rng_state() -> dict:
    """numpy's global MT19937 state and python's `random` state as plain tensors / tuples."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "python": random.getstate()}


def set_host_rng_state(state: dict) -> None:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def stage_recipe(cfg, stage: str, splits, model: Optional[torch.nn.Module] = None):
    """(Recipe, splits with the recipe's training transform) of one compress stage: "search" uses `cfg.recipe`,
    "finetune" `cfg.recipe.for_finetune()` (`recipe.finetune` overriding). EMA is built only where `model` is given (stage 2:
    the gated search model's weights are not what the search keeps)."""
    s = cfg.recipe if stage == "search" else cfg.recipe.for_finetune()
    return build_recipe(s, splits.num_classes, model), with_train_transform(splits, s)


def recipe_report(cfg) -> dict:
    """The recipe and precision settings as report.json records them."""
    return {"recipe": dataclasses.asdict(cfg.recipe), "amp": cfg.run.amp, "channels_last": cfg.run.channels_last,
            "compile": cfg.run.compile}
