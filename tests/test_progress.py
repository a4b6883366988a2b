"""Per-epoch progress lines and the notebooks' run folders (resume='auto' continues a run of the same config)."""
import re

import pytest

from uvclab.engine.config import load_config
from uvclab.engine.progress import EpochLines, clock
from uvclab.engine.runfiles import notebook_run_folder
from uvclab.errors import UvclabError
from uvclab.paths import CHECKPOINT


def test_epoch_line_shows_stage_values_elapsed_and_eta():
    lines = []
    line = EpochLines("search", 4, start=1, out=lambda s, flush: lines.append(s))
    line.t0 -= 30.0   # one epoch of this process took 30 s: two epochs are left
    line(1, R=0.5123, val=84.3)
    assert re.fullmatch(r"search    epoch 2/4  R 0\.512  val 84\.30 %  elapsed 0:30  ETA 1:00", lines[0]), lines
    EpochLines("search", 4, enabled=False, out=lambda s, flush: lines.append(s))(0, R=1.0)
    assert len(lines) == 1
    assert clock(3725) == "1:02:05" and clock(59.6) == "1:00"


def test_notebook_run_folder_keeps_a_run_of_the_same_config_and_replaces_others(tmp_path):
    cfg = load_config(overrides=["macs_ratio=0.4"])
    out = tmp_path / "run"
    out.mkdir()
    cfg.save(out / "config.yaml")
    (out / CHECKPOINT).write_bytes(b"x")
    assert notebook_run_folder(cfg, out, "auto") == "auto" and (out / CHECKPOINT).exists()
    other = load_config(overrides=["macs_ratio=0.3"])
    assert notebook_run_folder(other, out, "auto") == "no" and not out.exists()
    out.mkdir()
    cfg.save(out / "config.yaml")
    (out / CHECKPOINT).write_bytes(b"x")
    assert notebook_run_folder(cfg, out, None) == "no" and not out.exists()
    with pytest.raises(UvclabError, match="resume="):
        notebook_run_folder(cfg, out, "yes")
