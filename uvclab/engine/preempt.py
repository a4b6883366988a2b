"""Stopping a run cleanly: SIGTERM / SIGUSR1 end it after the current step; out of memory is one clear line.

Schedulers announce a preemption with a signal and a grace period (Slurm `--signal=USR1@60` or SIGTERM,
Kubernetes' SIGTERM, torchrun forwarding SIGTERM to its workers). While a run trains, `StopSignals` replaces
those signals' handlers with one that only records the signal: the step in progress and the checkpoint write
run to their end (a second signal changes nothing; the write is atomic anyway), then the training loop's
checkpoint hook (`engine.checkpointing`) raises `Preempted`, whose exit status (75, EX_TEMPFAIL) says "run
the same command again with --resume". `agree` gives every torchrun rank the same decision with one small
all-reduce per step, so all ranks stop after the same step.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from uvclab.engine.loop import world
from uvclab.errors import UvclabError

SIGNALS = ("SIGTERM", "SIGUSR1")  # the preemption notices a run answers with a checkpoint and a clean exit
_received: list[int] = []  # signal numbers recorded while a run trains (the first one names the stop)


def _record(signum, frame) -> None:
    _received.append(signum)


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGUSR1 are only recorded (`stop_requested`); the previous
    handlers come back on exit. Outside the main thread (where Python cannot set handlers) it does nothing."""

    def __enter__(self) -> "StopSignals":
        _received.clear()
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, _record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        _received.clear()


def stop_requested() -> int:
    """The number of the first stop signal received in this run (0: none)."""
    return _received[0] if _received else 0


def agree(*values: int) -> tuple[int, ...]:
    """Each value's maximum over the ranks (one all-reduce of len(values) integers): a flag set on any rank is
    set on all, and a signal received by any rank names the stop on all."""
    if world() == 1:
        return tuple(int(v) for v in values)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(v) for v in values], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


OOM_TEXTS = ("DefaultCPUAllocator", "out of memory", "not enough memory", "can't allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and any(t in str(e) for t in OOM_TEXTS))


@contextmanager
def oom_guard(checkpoint: Path):
    """Turn an out-of-memory error (CPU allocator, CUDA, Python) into one line that names the fix."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        what = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:160]
        kept = f"the last checkpoint '{checkpoint}' is kept" if Path(checkpoint).exists() else \
            "no checkpoint was written yet"
        raise UvclabError(f"Out of memory ({what}). Use a smaller batch_size (--set batch_size=...) or amp in a new "
                          f"--out folder, or free memory and continue with --resume ({kept}).") from e
