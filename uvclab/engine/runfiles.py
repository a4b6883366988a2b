"""The run folder: opening it (new run, resume, torchrun restart), the atomic checkpoint, the metrics log.

`checkpoint.pt` is written atomically (rank 0) after every epoch and inside epochs (`engine.checkpointing`)
and read with `weights_only=True`, so a killed run resumes and a corrupt file is a clear error;
`metrics.jsonl` gets one JSON record per step/epoch and is cut back to the checkpoint's length on resume.
Under torchrun rank 0 alone decides what to do with the folder and writes it; every rank then reads the
checkpoint and checks that all read the same bytes (the folder must be shared between nodes).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from uvclab.engine.loop import job_store, restart_count
from uvclab.errors import UvclabError
from uvclab.io_utils import atomic_write, check_writable, disk_full, is_disk_full, payload_bytes
from uvclab.paths import CHECKPOINT, CONFIG, REPORT
from uvclab.ranks import from_rank0, rank, same_on_all_ranks


class MetricsLog:
    """Append-only JSON lines, written by rank 0 only. `resume_at` (a checkpoint's `metrics_bytes`) cuts off
    the records written after that checkpoint, which the resumed run writes again."""

    def __init__(self, path: Path, fresh: bool = False, resume_at: Optional[int] = None):
        self.path = Path(path)
        if fresh and rank() == 0 and self.path.exists():
            self.path.unlink()
        if resume_at is not None and rank() == 0 and self.path.exists() and self.size() > resume_at:
            with open(self.path, "r+b") as f:
                f.truncate(resume_at)

    def size(self) -> int:
        return self.path.stat().st_size if rank() == 0 and self.path.exists() else 0

    def write(self, record: dict) -> None:
        if rank() == 0:
            line = json.dumps(record) + "\n"
            try:
                with open(self.path, "a") as f:
                    f.write(line)
            except OSError as e:  # a full disk: one clear line (a partial record is cut off on resume)
                if is_disk_full(e, self.path, len(line)):
                    raise disk_full(self.path, len(line)) from e
                raise


def save_checkpoint(path: Path, state: dict) -> None:
    if rank() == 0:
        atomic_write(path, lambda tmp: torch.save(state, tmp), size=payload_bytes(state))


def load_checkpoint(path: Path, data: Optional[bytes] = None) -> dict:
    """The checkpoint at `path` (or its bytes `data`, already read) on the CPU."""
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UvclabError(f"Cannot read checkpoint '{path}' ({e}); it is corrupt. Start a fresh run "
                          "(without --resume) in a new --out folder.") from e


def nonfinite_stop(stage: str, epoch: int, ckpt: Path):
    """An `on_nonfinite` hook for the training loop: stop with the last good checkpoint named."""
    def stop(step: int, loss: torch.Tensor) -> None:
        raise UvclabError(f"Non-finite loss ({loss.item()}) in {stage} epoch {epoch} step {step}. The last good "
                          f"state is kept in '{ckpt}'. Lower the learning rate (--set lr=... / finetune_lr=...) "
                          "and continue with --resume.")
    return stop


RESUME_MODES = ("no", "yes", "auto")


def resume_mode(resume: Union[bool, str], out: Path) -> str:
    """False/'no': refuse a folder that holds a run; True/'yes': continue the interrupted run in it (there must
    be one); 'auto': continue if there is something to continue, else start. A torchrun restart of a job
    that had opened `out` is 'auto' (a first start that was refused stays refused after a restart)."""
    mode = {False: "no", True: "yes"}.get(resume, resume)
    if mode not in RESUME_MODES:
        raise UvclabError(f"resume={resume!r}; use one of {RESUME_MODES} (or True / False).")
    return "auto" if _opened_by_this_job(out) else mode


def _opened_by_this_job(out: Path, mark: bool = False) -> bool:
    """Whether an earlier start of this torchrun job's workers opened `out` (kept in the agent's store, which
    lives as long as the job; without one, any restart counts); `mark=True` records it."""
    store, key = job_store(), "uvclab/run_folder"
    if store is None:
        return restart_count() > 0
    if mark:
        store.set(key, str(out.resolve()))
        return True
    return store.check([key]) and store.get(key).decode() == str(out.resolve())


def _plan(cfg, out: Path, mode: str) -> dict:
    """Rank 0: check the folder, write config.yaml (cfg: the CompressConfig); says whether to continue from its
    checkpoint."""
    ckpt, finished = out / CHECKPOINT, (out / REPORT).exists()
    if finished and (mode == "no" or not ckpt.exists()):
        raise UvclabError(f"'{out}' already holds a finished run; choose another --out folder.")
    if ckpt.exists() and mode == "no":
        raise UvclabError(f"'{out}' holds an interrupted run; continue it with --resume or choose another --out.")
    if not ckpt.exists() and mode == "yes":
        raise UvclabError(f"--resume, but '{out}' holds no run to continue; drop --resume to start one, or use "
                          "--resume auto (continue if there is something to continue).")
    if ckpt.exists() and (out / CONFIG).exists():
        if type(cfg).load(out / CONFIG).to_dict() != cfg.to_dict():
            raise UvclabError(f"--resume with a different config than the one saved in '{out}/config.yaml'; "
                              "resume with the same settings, or start a new --out folder.")
    check_writable(out)  # a read-only folder: a clear error now, not after the first epoch
    for tmp in out.glob(".*.tmp"):  # left by a worker killed mid-write (io_utils.atomic_write)
        tmp.unlink()
    cfg.save(out / CONFIG)
    return {"resume": ckpt.exists()}


def open_run_folder(cfg, out: Path, resume: Union[bool, str] = False) -> Optional[dict]:
    """Refuse to overwrite a run, or return the checkpoint to continue from (None: start). Collective under
    torchrun: every rank gets rank 0's decision and the same checkpoint, or the same error."""
    plan = None
    if rank() == 0:
        try:
            plan = _plan(cfg, out, resume_mode(resume, out))
            _opened_by_this_job(out, mark=True)
        except (UvclabError, OSError) as e:
            plan = {"error": e}
    plan = from_rank0(plan)
    if "error" in plan:
        raise plan["error"] if isinstance(plan["error"], UvclabError) else UvclabError(str(plan["error"]))
    if not plan["resume"]:
        return None
    data = (out / CHECKPOINT).read_bytes() if (out / CHECKPOINT).exists() else b""
    if not same_on_all_ranks(hashlib.sha256(data).hexdigest()):
        raise UvclabError(f"The ranks read different files at '{out}/checkpoint.pt'; under torchrun on several "
                          "machines --out must be one shared folder (the same path on every node).")
    ckpt = load_checkpoint(out / CHECKPOINT, data)
    if restart_count() > 0 and rank() == 0:
        print(f"uvclab: torchrun restart {restart_count()}: continuing from '{out / CHECKPOINT}' "
              f"({ckpt['stage']}, epoch {ckpt.get('epoch', '-')})", file=sys.stderr, flush=True)
    return ckpt


def notebook_run_folder(cfg, out: Path, resume: Optional[str] = "auto") -> str:
    """A notebook's run folder before `compress(cfg, out, resume=...)`; returns that resume mode.
    resume='auto': a folder holding a run of the same config is kept, so an interrupted (e.g. papermill, GPU)
    execution continues from its checkpoint and a finished one is read back; a folder of another config is
    replaced. resume=None (tests, a forced fresh run): the folder is deleted and the run starts from zero."""
    out = Path(out)
    if resume not in (None, "auto"):
        raise UvclabError(f"resume={resume!r}; use 'auto' (continue a run of the same settings) or None (start "
                          "fresh).")
    same = (resume == "auto" and (out / CHECKPOINT).exists() and (out / CONFIG).exists()
            and type(cfg).load(out / CONFIG).to_dict() == cfg.to_dict())
    if same:
        print(f"resume='auto': continuing the run in '{out.name}' (its config matches; resume=None starts fresh)")
        return "auto"
    shutil.rmtree(out, ignore_errors=True)
    return "no"
