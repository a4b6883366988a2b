"""Config sections (uvclab/engine/config.py): `run.` and `uvc.` hold what only a part reads; configs, run folders,
`--set` flags and notebook parameters with the flat keys of uvclab 0.2 still load (`into_sections`)."""
import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from uvclab.engine.config import (CompressConfig, RunSettings, config_from_parameters, into_sections, load_config)
from uvclab.engine.recipe import RecipeSettings
from uvclab.errors import UvclabError
from uvclab.prune.calibration import CalibrationSettings
from uvclab.uvc import UVCSettings

# config.yaml of a run folder written before the sections (uvclab 0.2, the default job; uvc.* abridged)
FLAT_0_2 = """method: uvc
model: null
model_kwargs: {}
pretrained: false
checkpoint: null
teacher: default
dataset: digits
data_root: null
split_seed: 0
macs_ratio: 0.5
budget_kind: macs
latency_batch_size: 32
latency_threads: null
search_resource: latency
latency_feedback: 3
latency_tolerance: 0.02
select_skips: validation
select_eval_samples: 1000
select_finetune_steps: 24
select_patience: null
seed: 0
device: cpu
batch_size: 64
lr: 0.0005
weight_decay: 0.05
warmup_epochs: 1
search_epochs: 12
finetune_epochs: 10
finetune_lr: 0.0005
kd: soft
kd_alpha: 0.5
kd_tau: 1.0
kd_reduction: batchmean
layout: compact
budget_slack: 0.02
max_steps_per_epoch: null
eval_max_samples: null
test_max_samples: null
threads: 2
num_workers: 0
progress: false
uvc:
  prune: true
  glr: 0.1
"""


def test_a_flat_config_of_uvclab_0_2_loads_into_its_sections(tmp_path):
    (tmp_path / "config.yaml").write_text(FLAT_0_2)
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.run == RunSettings(device="cpu", threads=2, num_workers=0, progress=False)
    assert (cfg.uvc.select_skips, cfg.uvc.latency_batch_size, cfg.uvc.search_resource) == ("validation", 32, "latency")
    assert cfg.uvc.glr == 0.1 and cfg.macs_ratio == 0.5
    cfg.save(tmp_path / "new.yaml")  # written by section, read back the same
    saved = yaml.safe_load((tmp_path / "new.yaml").read_text())
    assert saved["run"]["threads"] == 2 and "threads" not in saved and saved["uvc"]["select_skips"] == "validation"
    assert load_config(tmp_path / "new.yaml") == cfg


def test_flat_keys_from_set_flags_and_notebook_parameters():
    cfg = load_config(overrides=["device=cpu", "threads=3", "select_skips=validation", "run.num_workers=1",
                                 "uvc.latency_feedback=0", "budget=0.4"])
    assert (cfg.run.threads, cfg.run.num_workers, cfg.uvc.select_skips, cfg.uvc.latency_feedback) == \
        (3, 1, "validation", 0)
    assert cfg.macs_ratio == 0.4
    params = {"threads": 1, "device": "cpu", "latency_batch_size": 8, "dataset": "digits", "unrelated": 5}
    cfg = config_from_parameters(params, {"uvc.glr": 1.0}, latency_threads=1)
    assert (cfg.run.threads, cfg.run.progress, cfg.uvc.latency_batch_size, cfg.uvc.latency_threads, cfg.uvc.glr) == \
        (1, False, 8, 1, 1.0)


def test_unknown_ambiguous_and_contradicting_keys_are_clear_errors():
    with pytest.raises(UvclabError, match=r"Unknown config key\(s\) \['devices'\]"):
        load_config(overrides=["devices=cpu"])
    with pytest.raises(UvclabError, match=r"threads=2 and run.threads=3 disagree"):
        load_config(overrides=["threads=2", "run.threads=3"])
    with pytest.raises(UvclabError, match="uvc.threads"):  # a section's own key check names the section
        load_config(overrides=["uvc.threads=2"])
    with pytest.raises(UvclabError, match=r"run.threads must be >= 1"):
        load_config(overrides=["threads=0"])

    @dataclass(frozen=True)
    class Two:  # a config whose sections share a key name
        seed: int = 0
        a: RunSettings = field(default_factory=RunSettings)
        b: RunSettings = field(default_factory=RunSettings)
    with pytest.raises(UvclabError, match=r"'device' is a key of several sections \(a.device, b.device\)"):
        into_sections(Two, {"device": "cpu"})
    assert into_sections(Two, {"seed": 1, "a": {"device": "cuda"}}) == {"seed": 1, "a": {"device": "cuda"}}


def test_top_level_keys_every_method_reads():
    top = [f.name for f in dataclasses.fields(CompressConfig)]
    assert len(top) <= 32 and top[-4:] == ["run", "uvc", "calibration", "recipe"]
    moved = {"device", "threads", "num_workers", "progress", "select_skips", "latency_batch_size", "search_resource",
             "amp", "checkpoint_every_minutes", "repair", "mixup"}
    assert not moved & set(top) and moved <= {f.name for c in (RunSettings, UVCSettings, CalibrationSettings,
                                                               RecipeSettings) for f in dataclasses.fields(c)}
    assert load_config(overrides=["repair=lstsq", "mixup=0.8", "amp=bf16"]).calibration.repair == "lstsq"
