"""Runs of `uvclab compress` in a subprocess for the preemption and full-disk tests: a tiny digits job (3
search epochs, 2 fine-tune epochs of 6 steps), optionally sent SIGTERM from inside at its n-th training step,
and the checks that a resumed run equals the uninterrupted one bit for bit."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

QUICK = ["warmup_epochs=1", "search_epochs=2", "finetune_epochs=2", "max_steps_per_epoch=6", "progress=false",
         "uvc.gating_interval=5", "threads=1"]
SEARCH_STEPS, FINETUNE_STEPS = 18, 12  # training steps of QUICK's search and fine-tune (6 per epoch)

# the CLI with a hook: the process sends itself SIGTERM inside the forward pass of its n-th training step
# (the distillation loss: every search and fine-tune step calls it once)
KILL_AT = """
import os, signal, sys
from uvclab.engine import distill
real, calls = distill.distillation_loss, [0]
def loss(*a, **k):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
distill.distillation_loss = loss
from uvclab.ui.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(out: Path, *args: str, kill_at: int = 0, extra=(), timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m uvclab compress --out OUT` on QUICK (+ extra --set), SIGTERM at step `kill_at` (0: never)."""
    sets = sum((["--set", s] for s in QUICK + list(extra)), [])
    code = ["-c", KILL_AT] if kill_at else ["-m", "uvclab"]
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT_STEP=str(kill_at))
    return subprocess.run([sys.executable, *code, "compress", "--out", str(out), *sets, *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def reference(root: Path) -> Path:
    """The uninterrupted QUICK run, made once per test session under `root` (pytest's base temp folder)."""
    out = root / "uninterrupted-quick"
    if not (out / "report.json").exists():
        r = cli(out)
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_run(out: Path, ref: Path) -> None:
    """Report (but its time), structure, exported weights, UVC state and the metrics log are identical."""
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert drop(json.loads((out / "report.json").read_text())) == drop(json.loads((ref / "report.json").read_text()))
    for name in ("structure.json", "uvc_state.json", "model/uvclab.json"):
        assert (out / name).read_text() == (ref / name).read_text(), name
    assert sha256(out / "model/model.safetensors") == sha256(ref / "model/model.safetensors")
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()  # no step logged twice
    assert not list(out.glob(".*.tmp"))
