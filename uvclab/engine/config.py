"""Run settings: frozen dataclasses, YAML in and out, one `--set key=value` parser for every command.

`CompressConfig` drives `uvclab compress`: top-level keys every method reads, and sections `run.` (how the
job runs) and `uvc.` (`uvclab.uvc.settings.UVCSettings`: the optimiser and its final structure); flat keys
of older configs move into their section (`into_sections`). `TeacherConfig` drives `uvclab teacher`. The
same field names appear in YAML files, notebook parameters and CLI `--set` flags. Compress defaults are the
embedded job: the digits reference teacher compressed to half its MACs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from uvclab.vit.macs import LAYOUTS, check_budget
from uvclab.errors import UvclabError, at_least_one, one_of
from uvclab.io_utils import atomic_write_text
from uvclab.engine.data import DATASETS
from uvclab.engine.distill import KINDS as KD_KINDS, REDUCTIONS as KD_REDUCTIONS
from uvclab.engine.precision import AMP_MODES
from uvclab.engine.recipe import RecipeSettings
from uvclab.engine.strategies import STRATEGIES
from uvclab.prune.calibration import CalibrationSettings
from uvclab.uvc.settings import UVCSettings

BUDGET_KINDS = ("macs", "latency")
ABLATIONS = {  # UVC with one ingredient changed: name -> dotted config overrides (notebook 03, the benchmark)
    "uvc": {},
    "hard_kd": {"kd": "hard"},
    "no_kd": {"kd": "none"},
    "prune_only": {"uvc.block_skip": False},
    "skip_only": {"uvc.prune": False, "uvc.prune_dims": False},
}


class YamlConfig:
    """YAML in and out of a frozen config dataclass; its sections (dataclass fields) read from nested keys."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        d = into_sections(cls, d)
        for name, section in sections(cls).items():
            if isinstance(d.get(name), dict):
                d[name] = _from_dict(section, d[name], f"{name}.")
        return _from_dict(cls, d)

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_yaml(path))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass(frozen=True)
class RunSettings:
    """How a job runs rather than what it computes (config keys `run.*`; a flat `device` still works)."""
    device: str = "cpu"                  # cpu | cuda | cuda:N
    threads: Optional[int] = None        # torch CPU threads (None: torch's default)
    num_workers: int = 0                 # DataLoader worker processes
    progress: bool = True                # tqdm bars
    epoch_lines: bool = True             # one line per epoch (stage, epoch, R, validation, elapsed, ETA)
    pin_memory: bool = False             # pinned host memory in the training loader (GPU runs)
    amp: str = "none"                    # none | bf16 | fp16: autocast for forward + loss (fp16 adds a GradScaler);
                                         # UVC's counts, duals and MACs / latency math stay float32
    channels_last: bool = False          # NHWC input and patch-embedding weights
    compile: bool = False                # torch.compile the fine-tuned model and the teacher (opt-in)
    checkpoint_every_minutes: Optional[float] = 10.0  # also write checkpoint.pt inside epochs after this much
                                         # time since the last write (null or 0: only at epoch ends)
    checkpoint_every_steps: Optional[int] = None  # ... and after every N steps of a stage (null or 0: off)

    def __post_init__(self):
        at_least_one(self, ("threads",), "run.")
        one_of(self, {"amp": AMP_MODES}, "run.")
        if (self.checkpoint_every_minutes or 0) < 0 or (self.checkpoint_every_steps or 0) < 0:
            raise UvclabError("run.checkpoint_every_minutes and run.checkpoint_every_steps must be >= 0 "
                              "(0 or null: off).")


@dataclass(frozen=True)
class CompressConfig(YamlConfig):
    method: str = "uvc"                  # structure strategy, a name in engine.strategies.STRATEGIES: uvc (the
                                         # search) or a one-shot cut (they fine-tune for the warm-up + search
                                         # epochs too, so every method sees the same images)
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
    seed: int = 0
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
    run: RunSettings = field(default_factory=RunSettings)  # how the job runs: device, threads, workers, bars
    uvc: UVCSettings = field(default_factory=UVCSettings)  # method uvc: the optimiser and its final structure
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)  # the repair of a cut and the
                                         # images it, activation scores and Taylor importance calibrate on
    recipe: RecipeSettings = field(default_factory=RecipeSettings)  # timm's training recipe (Mixup/CutMix,
                                         # smoothing, RandAugment, erasing, EMA); `recipe.finetune`: stage 2's own

    def __post_init__(self):
        check_budget(self.macs_ratio)
        one_of(self, {"budget_kind": BUDGET_KINDS, "method": STRATEGIES, "kd": KD_KINDS,
                      "kd_reduction": KD_REDUCTIONS, "layout": LAYOUTS})
        if self.budget_kind == "latency" and self.method != "uvc":
            raise UvclabError(f"budget_kind=latency needs method=uvc (the one-shot method '{self.method}' cuts to "
                              "a MACs budget); use budget_kind=macs.")
        if self.dataset not in DATASETS:
            raise UvclabError(f"Unknown dataset '{self.dataset}'. Choose one of: {', '.join(DATASETS)}.")
        for name in ("warmup_epochs", "search_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise UvclabError(f"{name} must be >= 0.")
        if self.batch_size < 1 or self.lr <= 0 or self.finetune_lr <= 0:
            raise UvclabError("batch_size, lr and finetune_lr must be positive.")
        at_least_one(self, ("max_steps_per_epoch", "eval_max_samples", "test_max_samples"))
        if not 0 <= self.kd_alpha <= 1:
            raise UvclabError(f"kd_alpha={self.kd_alpha} must be in [0, 1].")
        if self.model is None and self.teacher is None:
            raise UvclabError("Give a model (timm name) or a teacher card to start from.")

    @classmethod
    def from_dict(cls, d: dict) -> "CompressConfig":
        d = into_sections(cls, d)
        if "budget" in d:  # the budget's other name: one value, whatever its kind
            b = d.pop("budget")
            if "macs_ratio" in d and d["macs_ratio"] != b:
                raise UvclabError(f"budget={b} and macs_ratio={d['macs_ratio']} disagree; they are one key, give one.")
            d["macs_ratio"] = b
        if isinstance(d.get("uvc"), dict):  # run folders before 0.2 copied the budget into uvc
            d["uvc"] = {k: v for k, v in d["uvc"].items() if k != "macs_ratio"}
        return super().from_dict(d)


@dataclass(frozen=True)
class TeacherConfig(YamlConfig):
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
        if self.dataset not in DATASETS:
            raise UvclabError(f"Unknown dataset '{self.dataset}'. Choose one of: {', '.join(DATASETS)}.")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UvclabError("epochs, batch_size and lr must be positive.")



def sections(cls) -> dict:
    """name -> dataclass of the config's sections (fields that are dataclasses themselves: run, uvc)."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)}


def into_sections(cls, d: dict) -> dict:
    """Configs from before the sections (flat YAML, run folders, `--set device=cuda`, notebook parameters): a key
    that is no field of `cls` but a field of exactly one of its sections moves into that section
    (`device` -> `run.device`, `select_skips` -> `uvc.select_skips`). The one place old keys are mapped."""
    top, secs = {f.name for f in dataclasses.fields(cls)}, sections(cls)
    out = {k: dict(v) if isinstance(v, dict) and k in secs else v for k, v in d.items()}
    for key in [k for k in d if k not in top]:
        homes = [n for n, sec in secs.items() if key in {f.name for f in dataclasses.fields(sec)}]
        if len(homes) > 1:
            raise UvclabError(f"'{key}' is a key of several sections ({', '.join(h + '.' + key for h in homes)}); "
                              "give it with its section.")
        if homes:
            sec = out.setdefault(homes[0], {})
            if key in sec and sec[key] != d[key]:
                raise UvclabError(f"{key}={d[key]!r} and {homes[0]}.{key}={sec[key]!r} disagree; give one of them.")
            sec[key] = out.pop(key)
    return out


def _from_dict(cls, d: dict, prefix: str = ""):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UvclabError(f"Unknown config key(s) {[prefix + k for k in unknown]}. "
                          f"Known: {sorted(prefix + k for k in known)}.")
    try:
        return cls(**_numbers(cls, d, prefix))
    except TypeError as e:
        raise UvclabError(f"Bad config: {e}") from e


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
    fields = {f.name for c in (CompressConfig, *sections(CompressConfig).values()) for f in dataclasses.fields(c)}
    d = {k: v for k, v in params.items() if k in fields and not k.startswith("_")}  # flat: into_sections maps them
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
