"""Run settings: frozen dataclasses, YAML in and out, one `--set key=value` parser for every command.

`CompressConfig` drives `uvclab compress` (UVC optimiser settings under `uvc.`, see
`uvclab.uvc.settings.UVCSettings`); `TeacherConfig` drives `uvclab teacher`. The same field names appear in
YAML files, notebook parameters and CLI `--set` flags. Compress defaults are the embedded job: the digits
reference teacher compressed to half its MACs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from uvclab.vit.macs import LAYOUTS, check_budget
from uvclab.errors import UvclabError
from uvclab.engine.distill import KINDS as KD_KINDS, REDUCTIONS as KD_REDUCTIONS
from uvclab.prune.calibration import CalibrationSettings
from uvclab.prune.repair import REPAIRS
from uvclab.uvc.settings import UVCSettings
from uvclab.engine.precision import check_amp  # issue 27: training recipe and mixed precision
from uvclab.engine.recipe import RECIPE_KEYS, RecipeSettings

BUDGET_KINDS = ("macs", "latency")
SKIP_SELECTIONS = ("auto", "gates", "validation")
METHODS = ("uvc", "magnitude", "uniform", "depth", "torch_pruning", "isomorphic")  # structure strategies
ABLATIONS = {  # UVC with one ingredient changed: name -> dotted config overrides (notebook 03, the benchmark)
    "uvc": {},
    "hard_kd": {"kd": "hard"},
    "no_kd": {"kd": "none"},
    "prune_only": {"uvc.block_skip": False},
    "skip_only": {"uvc.prune": False, "uvc.prune_dims": False},
}


@dataclass(frozen=True)
class CompressConfig:
    method: str = "uvc"                  # structure strategy: uvc (the search) | magnitude | uniform | depth |
                                         # torch_pruning | isomorphic (one-shot cuts; they fine-tune for the
                                         # warm-up + search epochs too, so every method sees the same images)
    model: Optional[str] = None          # timm name; None = the teacher's architecture
    model_kwargs: dict = field(default_factory=dict)  # timm kwargs (img_size, depth, num_classes, ...)
    pretrained: bool = False             # start from timm's pretrained weights (online)
    checkpoint: Optional[str] = None     # local weights to start the student from
    teacher: Optional[str] = "default"   # teacher card/weights; 'default': data/teachers/<dataset>_vit.json;
                                         # null: the uncompressed starting model (UVC's choice)
    dataset: str = "digits"              # digits | fashion_mnist | cifar10 | cifar100 | imagefolder
    data_root: Optional[str] = None      # dataset folder (fashion_mnist, cifar, imagefolder)
    split_seed: int = 0                  # fixes the train/validation/test split
    macs_ratio: float = 0.5              # the budget B (also accepted as `budget`): exported MACs, or with
                                         # budget_kind latency the predicted latency, <= B x dense
    budget_kind: str = "macs"            # macs | latency (UVC: R = the latency table's predicted ms / dense;
                                         # report.json adds the measured latency of dense and export)
    latency_batch_size: int = 64         # latency budget: the batch the table is measured (and the export timed) at
    latency_threads: Optional[int] = None  # latency budget: torch threads when timing (None: `threads`, else torch's)
    search_resource: str = "macs"        # latency budget: the search's R: macs (MACs, to the MACs ratio of a
                                         # magnitude cut predicted at the latency budget; chosen on validation) |
                                         # latency (the table's prediction); the final structure is fitted to the
                                         # latency budget either way
    latency_feedback: int = 3            # latency budget: refits when the export measures over the budget (0: off)
    latency_tolerance: float = 0.02      # latency budget: measured ratio accepted up to B x (1 + this)
    select_skips: str = "auto"           # UVC's final structure: which blocks to skip: gates (the search's own
                                         # decisions) | validation (candidates with 0, 1, 2.. blocks skipped, the
                                         # best on validation) | auto (validation for a latency budget, else gates)
    select_eval_samples: Optional[int] = 1000  # validation images per skip candidate (null: all)
    select_finetune_steps: int = 24      # distillation steps each skip candidate gets before it is scored (0: none)
    select_patience: Optional[int] = None  # stop adding skips after this many candidates in a row below the best
                                         # (null: until a candidate falls below the budget band)
    seed: int = 0
    device: str = "cpu"                  # cpu | cuda | cuda:N
    batch_size: int = 64
    lr: float = 5e-4                     # stage-1 AdamW lr (reference: 1e-4 at batch 256 on ImageNet)
    weight_decay: float = 0.05
    warmup_epochs: int = 1               # stage-1 warm-up: weights only (reference: 5)
    search_epochs: int = 12              # stage-1 epochs after warm-up (reference: 26)
    finetune_epochs: int = 10            # stage 2 (reference: 120-150)
    finetune_lr: float = 5e-4
    kd: str = "soft"                     # soft | hard | none (DeiT distillation token: automatic for _distilled)
    kd_alpha: float = 0.5                # weight of the KD term
    kd_tau: float = 1.0
    kd_reduction: str = "batchmean"      # batchmean | numel (reference: numel, ~1000x weaker on ImageNet)
    layout: str = "compact"              # exported attention layout: compact (v narrower than q/k, explicit
                                         # matmuls) | fused (one padded width per layer, fused SDPA)
    budget_slack: float = 0.02           # the final structure lands in [B - slack, B]
    max_steps_per_epoch: Optional[int] = None  # cap for quick runs
    eval_max_samples: Optional[int] = None  # cap on validation images (quick runs; in report.json)
    test_max_samples: Optional[int] = None  # cap on test images (None: the whole test split, for reported numbers)
    threads: Optional[int] = None        # torch CPU threads (None: torch's default)
    num_workers: int = 0
    progress: bool = True                # tqdm bars
    checkpoint_every_minutes: Optional[float] = 10.0  # also write checkpoint.pt inside epochs after this much
                                         # time since the last write (null or 0: only at epoch ends)
    checkpoint_every_steps: Optional[int] = None  # ... and after every N steps of a stage (null or 0: off)
    uvc: UVCSettings = field(default_factory=UVCSettings)
    # ---- issue 27: speed switches (the lead moves them into the `run` section) ----
    amp: str = "none"                    # none | bf16 | fp16: autocast for forward + loss (fp16 adds a GradScaler)
    channels_last: bool = False          # NHWC input and patch-embedding weights
    compile: bool = False                # torch.compile the fine-tuned model and the teacher (opt-in)
    pin_memory: bool = False             # pinned host memory in the training loader (GPU runs)
    # ---- issue 27: timm's training recipe (uvclab.engine.recipe); flat `--set mixup=0.8` reaches recipe.mixup ----
    recipe: RecipeSettings = field(default_factory=RecipeSettings)  # stage 1 (and stage 2 unless finetune_recipe)
    finetune_recipe: Optional[RecipeSettings] = None  # stage 2's recipe; given as a mapping, its keys override
                                         # `recipe`'s (e.g. {aa: rand-m9-mstd0.5-inc1, reprob: 0.25}); None: recipe
    repair: str = "none"                 # after the structure is chosen, before fine-tuning: none | mean (pruned
                                         # channels' mean folded into the bias) | lstsq (ridge refit of the kept
                                         # columns of attn.proj / mlp.fc2 onto the dense output)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)  # images, ridge, memory limit

    def __post_init__(self):
        check_budget(self.macs_ratio)
        if self.repair not in REPAIRS:
            raise UvclabError(f"repair='{self.repair}' is not one of {REPAIRS}.")
        if self.budget_kind not in BUDGET_KINDS:
            raise UvclabError(f"budget_kind='{self.budget_kind}' is not one of {BUDGET_KINDS}.")
        if self.budget_kind == "latency" and self.method != "uvc":
            raise UvclabError(f"budget_kind=latency needs method=uvc (the one-shot method '{self.method}' cuts to "
                              "a MACs budget); use budget_kind=macs.")
        if self.method not in METHODS:
            raise UvclabError(f"method='{self.method}' is not one of {METHODS}.")
        from uvclab.engine.data import DATASETS
        if self.dataset not in DATASETS:
            raise UvclabError(f"Unknown dataset '{self.dataset}'. Choose one of: {', '.join(DATASETS)}.")
        if self.kd not in KD_KINDS:
            raise UvclabError(f"kd='{self.kd}' is not one of {KD_KINDS}.")
        if self.kd_reduction not in KD_REDUCTIONS:
            raise UvclabError(f"kd_reduction='{self.kd_reduction}' is not one of {KD_REDUCTIONS}.")
        if self.layout not in LAYOUTS:
            raise UvclabError(f"layout='{self.layout}' is not one of {LAYOUTS}.")
        for name in ("warmup_epochs", "search_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise UvclabError(f"{name} must be >= 0.")
        if self.batch_size < 1 or self.lr <= 0 or self.finetune_lr <= 0:
            raise UvclabError("batch_size, lr and finetune_lr must be positive.")
        for name in ("max_steps_per_epoch", "eval_max_samples", "test_max_samples", "threads", "latency_threads",
                     "latency_batch_size", "select_eval_samples", "select_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UvclabError(f"{name} must be >= 1 (or null for no limit).")
        if (self.checkpoint_every_minutes or 0) < 0 or (self.checkpoint_every_steps or 0) < 0:
            raise UvclabError("checkpoint_every_minutes and checkpoint_every_steps must be >= 0 (0 or null: off).")
        if self.search_resource not in BUDGET_KINDS:
            raise UvclabError(f"search_resource='{self.search_resource}' is not one of {BUDGET_KINDS}.")
        if self.select_skips not in SKIP_SELECTIONS:
            raise UvclabError(f"select_skips='{self.select_skips}' is not one of {SKIP_SELECTIONS}.")
        if self.latency_feedback < 0 or self.latency_tolerance < 0 or self.select_finetune_steps < 0:
            raise UvclabError("latency_feedback, latency_tolerance and select_finetune_steps must be >= 0.")
        if not 0 <= self.kd_alpha <= 1:
            raise UvclabError(f"kd_alpha={self.kd_alpha} must be in [0, 1].")
        check_amp(self.amp)
        if self.model is None and self.teacher is None:
            raise UvclabError("Give a model (timm name) or a teacher card to start from.")

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressConfig":
        d = dict(d)
        if "budget" in d:  # the budget's other name: one value, whatever its kind
            b = d.pop("budget")
            if "macs_ratio" in d and d["macs_ratio"] != b:
                raise UvclabError(f"budget={b} and macs_ratio={d['macs_ratio']} disagree; they are one key, give one.")
            d["macs_ratio"] = b
        uvc = d.pop("uvc", None) or {}
        if isinstance(uvc, dict):
            uvc = {k: v for k, v in uvc.items() if k != "macs_ratio"}  # run folders before 0.2 copied the budget here
            uvc = _from_dict(UVCSettings, uvc, "uvc.")
        calibration = d.pop("calibration", None) or {}
        if isinstance(calibration, dict):
            calibration = _from_dict(CalibrationSettings, calibration, "calibration.")
        return _from_dict(cls, dict(_recipe_sections(d), uvc=uvc, calibration=calibration))

    def save(self, path: str | Path) -> None:
        save_yaml(self, path)


@dataclass(frozen=True)
class TeacherConfig:
    """`uvclab teacher`: train a ViT from scratch (DeiT recipe scaled down for CPU), keep its best epoch."""
    model: str = "deit_tiny_patch16_224"  # timm ViT name, shrunk by model_kwargs
    model_kwargs: dict = field(default_factory=dict)  # timm kwargs (embed_dim, depth, ...); img_size, in_chans
                                         # and num_classes come from the data unless set here
    dataset: str = "digits"
    data_root: Optional[str] = None
    split_seed: int = 0                  # fixes the train/validation/test split
    val_fraction: Optional[float] = None  # None: the dataset's default
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3                     # peak AdamW lr
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    augment: bool = True                 # crop / flip augmentation of the training images
    seed: int = 0                        # weights init, shuffling and augmentation
    max_steps_per_epoch: Optional[int] = None  # cap for timing probes
    init: Optional[str] = None           # continue from this teacher (card or weights) instead of from scratch
    fp16: Optional[bool] = None          # store fp16 weights (None: only when fp32 would exceed 10 MB)

    def __post_init__(self):
        from uvclab.engine.data import DATASETS
        if self.dataset not in DATASETS:
            raise UvclabError(f"Unknown dataset '{self.dataset}'. Choose one of: {', '.join(DATASETS)}.")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UvclabError("epochs, batch_size and lr must be positive.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherConfig":
        return _from_dict(cls, d)

    def save(self, path: str | Path) -> None:
        save_yaml(self, path)


def _recipe_sections(d: dict) -> dict:
    """issue 27: flat recipe keys (`mixup: 0.8`) go into `recipe`; a `finetune_recipe` mapping overrides recipe's
    keys for stage 2. (To be replaced by the config's alias function of issue 23.)"""
    d = dict(d)
    recipe = d.pop("recipe", None) or {}
    if isinstance(recipe, dict):
        recipe = dict(recipe, **{k: d.pop(k) for k in RECIPE_KEYS if k in d})
        recipe = _from_dict(RecipeSettings, recipe, "recipe.")
    ft = d.pop("finetune_recipe", None)
    if isinstance(ft, dict):
        ft = _from_dict(RecipeSettings, dict(dataclasses.asdict(recipe), **ft), "finetune_recipe.")
    return dict(d, recipe=recipe, finetune_recipe=ft)


def _from_dict(cls, d: dict, prefix: str = ""):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UvclabError(f"Unknown {prefix or 'config '}key(s) {unknown}. Known: {sorted(known)}.")
    try:
        return cls(**_numbers(cls, d, prefix))
    except TypeError as e:
        raise UvclabError(f"Bad config: {e}") from e


def save_yaml(cfg, path: str | Path) -> None:
    from uvclab.io_utils import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _numbers(cls, d: dict, prefix: str = "") -> dict:
    """Number fields as numbers: floats accept ints and numeric strings (YAML 1.1 reads `3e-5` as a string);
    anything else is a clear error here, not a crash deep inside a run."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(d)
    for k, v in d.items():
        t = types.get(k)
        if t not in ("float", "int", "Optional[int]", "Optional[float]") or (v is None and t.startswith("Optional")):
            continue
        try:
            if isinstance(v, bool):
                raise ValueError
            num = float(v)
            if "int" in t and num != int(num):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            kind = ("a number" if "float" in t else "an integer") + (" or null" if t.startswith("Optional") else "")
            raise UvclabError(f"{prefix}{k}={v!r} must be {kind}.") from None
        out[k] = num if "float" in t else int(num)
    return out


def read_yaml(path: Optional[str | Path]) -> dict:
    """A YAML mapping from a file (empty without a path); clear errors for a missing or malformed file."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UvclabError(f"Config file '{p}' does not exist.")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UvclabError(f"Config file '{p}' is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise UvclabError(f"Config file '{p}' must hold a mapping of keys to values.")
    return d


def parse_overrides(items, into: Optional[dict] = None) -> dict:
    """The one `--set key=value` parser: values read as YAML (numbers, true/false/null, lists), dotted keys
    reach nested groups (`uvc.glr=0.05`, `model_kwargs.depth=6`). `items` is a list of 'key=value' strings or
    a mapping of dotted keys to values (notebook parameters). Returns `into` updated (a new dict if None)."""
    d = {} if into is None else into
    pairs = items.items() if isinstance(items, Mapping) else [(i, None) for i in items or []]
    for item, given in pairs:
        if isinstance(items, Mapping):
            key, parsed = item, given
        else:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UvclabError(f"--set expects key=value (e.g. --set macs_ratio=0.3), got '{item}'.")
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
        target = d
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UvclabError(f"--set {key}: '{part}' is not a group of settings.")
        target[leaf] = parsed
    return d


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                **kwargs: Any) -> CompressConfig:
    """Defaults <- YAML file <- kwargs <- `key=value` overrides (dotted keys reach `uvc.`)."""
    return CompressConfig.from_dict(parse_overrides(overrides, dict(read_yaml(path), **kwargs)))


def config_from_parameters(params: Mapping, overrides=None, **extra: Any) -> CompressConfig:
    """A CompressConfig from a notebook's parameter variables: every name in `params` (e.g. `globals()` after
    the papermill cell) that is a config field, then `extra`, then dotted `overrides`; progress bars off."""
    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    d = {k: v for k, v in params.items() if k in fields and not k.startswith("_")}
    return CompressConfig.from_dict(parse_overrides(overrides, dict(d, progress=False, **extra)))


def load_teacher_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                        **kwargs: Any) -> TeacherConfig:
    """As `load_config`, for `uvclab teacher`. A --set key that is not a TeacherConfig field is a model
    kwarg (`--set embed_dim=96` = `--set model_kwargs.embed_dim=96`), as the teacher cards record it."""
    d = dict(read_yaml(path), **kwargs)
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    for key, value in parse_overrides(overrides).items():
        if key in fields and key != "model_kwargs":
            d[key] = value
        else:
            mk = d.setdefault("model_kwargs", {})
            mk.update(value if key == "model_kwargs" else {key: value})
    return TeacherConfig.from_dict(d)
