"""A full disk, a read-only run folder and running out of memory: one clear line naming the fix, nothing lost.

Real full disks are small tmpfs mounts (root on Linux; skipped where `mount` is not allowed); the same paths
are also driven by injected faults, which run everywhere."""
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import random_structure, small_vit
from resume_runs import QUICK, assert_same_run, cli, reference
from test_compress import quick_cfg
from uvclab import io_utils
from uvclab.engine import distill as search_stage
from uvclab.engine.runfiles import MetricsLog, load_checkpoint, open_run_folder, save_checkpoint
from uvclab.errors import DiskFull, UvclabError
from uvclab.ui.cli import main
from uvclab.vit.export import export_model, save_pruned

FIX = "Free space or move the run folder, then --resume."


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs folder of that size (e.g. '3m'); unmounted afterwards."""
    mounted = []

    def mount(size: str, ro: bool = False):
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(d)],
                           capture_output=True, text=True) if shutil.which("mount") else None
        if r is None or r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() if r else 'no mount command'})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(folder, leave: int) -> None:
    """Leave about `leave` bytes free on folder's file system."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


# ---- each write site on a real full disk ---------------------------------------------------------------

def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_loadable(tmpfs):
    fs = tmpfs("3m")
    first = {"stage": "search", "epoch": 1, "w": torch.arange(400_000, dtype=torch.float32)}  # 1.6 MB
    save_checkpoint(fs / "checkpoint.pt", first)
    with pytest.raises(DiskFull) as e:  # a second 1.6 MB next to the first does not fit in 3 MB
        save_checkpoint(fs / "checkpoint.pt", dict(first, epoch=2))
    msg = str(e.value)
    assert msg.startswith(f"No space left on the file system of '{fs / 'checkpoint.pt'}': writing it needs about "
                          "1.5 MiB (1,600,") and msg.endswith(FIX) and "\n" not in msg
    kept = load_checkpoint(fs / "checkpoint.pt")
    assert kept["epoch"] == 1 and torch.equal(kept["w"], first["w"])
    assert os.listdir(fs) == ["checkpoint.pt"]  # no temporary file left


def _export(fs):
    model = small_vit()
    save_pruned(export_model(model, random_structure(model)), fs / "model")


def _report(fs):
    io_utils.atomic_write_text(fs / "report.json", json.dumps({"top1": [1.0] * 20_000}))


def _metrics(fs):
    MetricsLog(fs / "metrics.jsonl").write({"stage": "search", "dims_removed": [[1.0] * 64] * 64})


def _predictions(fs):
    from uvclab.compare.predictions import _write_cache
    with pytest.warns(UserWarning) as w:
        _write_cache(fs / "predictions/model_test_logits.safetensors", np.zeros((1000, 100), np.float32), {"n": "1"})
    raise DiskFull(str(w[0].message))  # a cache is not needed: it warns (with the same line) and recomputes


@pytest.mark.parametrize("site,name", [(_export, "model/model.safetensors"), (_report, "report.json"),
                                       (_metrics, "metrics.jsonl"),
                                       (_predictions, "predictions/model_test_logits.safetensors")])
def test_a_full_disk_at_each_write_site_is_one_line_naming_the_file_size_and_fix(tmpfs, site, name):
    fs = tmpfs("1m")
    (fs / "model").mkdir()
    (fs / "predictions").mkdir()
    fill(fs, 8192)
    with pytest.raises(DiskFull) as e:
        site(fs)
    msg = str(e.value)
    assert f"No space left on the file system of '{fs / name}': writing it needs about " in msg, msg
    assert FIX in msg and "\n" not in msg  # the cache's warning wraps the line: "... (LINE); recomputed next time"
    assert not list(fs.rglob(".*.tmp"))


# ---- the same, injected ---------------------------------------------------------------------------------

def test_torch_saves_lost_errno_is_recognised_by_the_free_space(tmp_path, monkeypatch):
    """torch.save on a full disk raises '[enforce fail at inline_container.cc:672] . unexpected pos ...' with no
    errno: a full disk when the file system has less room than the checkpoint, else the error as it was."""
    save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})

    def full(obj, f):
        open(f, "wb").write(b"PK" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RuntimeError, match="unexpected pos") as e:  # plenty of room: not mislabelled
        save_checkpoint(tmp_path / "checkpoint.pt", {"w": torch.zeros(10)})
    assert not isinstance(e.value, DiskFull)
    monkeypatch.setattr(io_utils.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(DiskFull, match=r"needs about 4,\d\d\d bytes and 4,096 bytes are free there"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"w": torch.zeros(1000)})
    assert load_checkpoint(tmp_path / "checkpoint.pt") == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_enospc_from_any_writer_is_disk_full_and_other_errors_pass_unchanged(tmp_path):
    def enospc(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match="needs about 123 bytes"):
        io_utils.atomic_write(tmp_path / "x.json", enospc, size=123)
    with pytest.raises(PermissionError):
        io_utils.atomic_write(tmp_path / "x.json", lambda tmp: (_ for _ in ()).throw(PermissionError(13, "no")))
    assert not os.listdir(tmp_path)


# ---- end to end: the CLI on a disk that holds one checkpoint but not two --------------------------------

@pytest.mark.slow
def test_compress_on_a_full_disk_stops_with_one_line_and_resumes_elsewhere_as_uninterrupted(tmpfs,
                                                                                              tmp_path_factory):
    ref = reference(tmp_path_factory.getbasetemp())
    fs = tmpfs("12m")  # the search checkpoint is ~8 MB: the first fits, a second beside it does not
    r = cli(fs / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith(f"uvclab: error: No space left on the file system of '{fs / 'run/checkpoint.pt'}'")
    assert r.stderr.strip().endswith(FIX) and len(r.stderr.strip().splitlines()) == 1
    ckpt = load_checkpoint(fs / "run/checkpoint.pt")
    assert (ckpt["stage"], ckpt["epoch"], ckpt["step"]) == ("search", 1, 0)
    moved = tmp_path_factory.mktemp("bigger") / "run"
    shutil.copytree(fs / "run", moved)
    r = cli(moved, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(moved, ref)


# ---- a read-only run folder ----------------------------------------------------------------------------

def test_a_read_only_run_folder_is_an_error_before_any_training(tmpfs, capsys):
    ro = tmpfs("1m", ro=True)
    code = main(["compress", "--out", str(ro / "run")] + sum((["--set", s] for s in QUICK), []))
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (f"uvclab: error: The run folder '{ro / 'run'}' is not writable (Read-only "
                                         "file system). Choose a writable --out; to continue an interrupted run, "
                                         "copy its folder there and use --resume.")


def test_resuming_in_a_folder_made_read_only_is_an_error_before_any_training(tmpfs):
    fs = tmpfs("20m")
    cfg = quick_cfg()
    open_run_folder(cfg, fs / "run")
    save_checkpoint(fs / "run/checkpoint.pt", {"stage": "search", "epoch": 1})
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    with pytest.raises(UvclabError, match=r"'.*/run' is not writable \(Read-only file system\)"):
        open_run_folder(cfg, fs / "run", resume=True)


def test_an_unwritable_run_folder_is_a_clear_error_injected(tmp_path, monkeypatch):
    def denied(**kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(io_utils.tempfile, "mkstemp", denied)
    with pytest.raises(UvclabError, match=r"is not writable \(Permission denied\)\. Choose a writable --out"):
        open_run_folder(quick_cfg(), tmp_path / "run")


# ---- out of memory in a step ---------------------------------------------------------------------------

CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                       "tried to allocate 1099511627776 bytes.")


@pytest.mark.parametrize("error,at", [(CPU_OOM, 8), (torch.cuda.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.1 GiB\nmore lines"), 1)])
def test_out_of_memory_in_a_step_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys, error, at):
    real, calls = search_stage.distillation_loss, [0]

    def loss(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            raise error
        return real(*a, **k)

    monkeypatch.setattr(search_stage, "distillation_loss", loss)
    out = tmp_path / "run"
    code = main(["compress", "--out", str(out)] + sum((["--set", s] for s in QUICK), []))
    err = capsys.readouterr().err.strip()
    first = str(error).splitlines()[0]
    kept = f"the last checkpoint '{out / 'checkpoint.pt'}' is kept" if at > 6 else "no checkpoint was written yet"
    assert code == 2 and err == (f"uvclab: error: Out of memory ({first}). Use a smaller batch_size (--set "
                                 "batch_size=...) or amp in a new --out folder, or free memory and continue with "
                                 f"--resume ({kept}).")
    if at > 6:  # after the warm-up epoch's checkpoint
        assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
