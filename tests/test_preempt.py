"""Preemption: SIGTERM / SIGUSR1 stop `uvclab compress` after the current step with a checkpoint and exit
status 75; `--resume` then continues from that step and ends bit for bit as the uninterrupted run (search
and fine-tune, one process and torchrun). Plus the pieces: the skipped data order, the signal flag, the
checkpoints every N steps."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from resume_runs import FINETUNE_STEPS, QUICK, SEARCH_STEPS, assert_same_run, cli, reference
from uvclab.engine import checkpointing, compress as train
from uvclab.engine.config import load_config
from uvclab.engine.loop import seeded_loader
from uvclab.engine.preempt import StopSignals, stop_requested
from uvclab.errors import Preempted, UvclabError

EXIT_PREEMPTED = 75


class Counting(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.loaded = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        return torch.tensor([float(i)]), i


@pytest.mark.parametrize("skip", [0, 1, 3, 5])
def test_a_skipped_loader_continues_the_same_order_without_loading_the_skipped_batches(skip):
    full = [y for _, y in seeded_loader(Counting(50), 8, seed=7)]  # 6 full batches, the ragged one dropped
    data = Counting(50)
    rest = [y for _, y in seeded_loader(data, 8, seed=7, skip_batches=skip)]
    assert len(rest) == 6 - skip and all(torch.equal(a, b) for a, b in zip(rest, full[skip:]))
    assert sorted(data.loaded) == sorted(torch.cat(full[skip:]).tolist())  # only the batches it yields


def test_a_stop_signal_only_sets_a_flag_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals():
        assert stop_requested() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (e.g. during the checkpoint write): recorded only
        assert stop_requested() == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before and stop_requested() == 0
    assert issubclass(Preempted, UvclabError) and Preempted.exit_status == EXIT_PREEMPTED


def test_checkpoints_every_n_steps_are_written_at_the_same_steps_and_hold_the_place_in_the_epoch(tmp_path,
                                                                                              monkeypatch):
    cfg = load_config(overrides=QUICK + ["checkpoint_every_steps=4", "search_epochs=1", "finetune_epochs=1"])
    written, real = [], checkpointing.save_checkpoint

    def record(path, state):
        written.append((state["stage"], state["epoch"], state["step"], state["metrics_bytes"]))
        real(path, state)

    monkeypatch.setattr(checkpointing, "save_checkpoint", record)
    train.compress(cfg, tmp_path / "run")
    # 2 search epochs (12 steps: mid-epoch after steps 4, 8; epoch ends at 6, 12), 1 fine-tune epoch (6 steps)
    assert [w[:3] for w in written] == [("search", 0, 4), ("search", 1, 0), ("search", 1, 2), ("search", 2, 0),
                                        ("finetune", 0, 4), ("finetune", 1, 0)]
    lines = [len(line) + 1 for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert written[0][3] == sum(lines[:4])  # the log's length after the 4th step record


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["search", "finetune"])
def test_sigterm_at_a_random_step_exits_75_and_resume_equals_the_uninterrupted_run(tmp_path_factory, stage):
    ref = reference(tmp_path_factory.getbasetemp())
    rng = random.Random()
    step = rng.randint(1, SEARCH_STEPS) if stage == "search" else SEARCH_STEPS + rng.randint(1, FINETUNE_STEPS)
    out = tmp_path_factory.mktemp("preempt") / "run"
    r = cli(out, kill_at=step)
    assert r.returncode == EXIT_PREEMPTED, f"step {step}: {r.stderr[-3000:]}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    k = step if stage == "search" else step - SEARCH_STEPS  # the step it was in finished, then it stopped
    assert (ckpt["stage"], 6 * ckpt["epoch"] + ckpt["step"]) == (stage, k), f"killed in step {step}"
    name, epochs = ("search", 3) if stage == "search" else ("fine-tune", 2)
    assert lines[0] == (f"uvclab: Stopped by SIGTERM after {name} epoch {(k - 1) // 6 + 1}/{epochs}"
                        f" step {(k - 1) % 6 + 1}/6; checkpoint '{out / 'checkpoint.pt'}' written. Continue with "
                        "the same command and --resume (Python: resume='auto').")
    assert not (out / "report.json").exists()
    r = cli(out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(out, ref)


# ---- torchrun ---------------------------------------------------------------------------------------

def torchrun(out, *args, restarts: int = 0) -> subprocess.Popen:
    from test_runfiles import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={restarts}",
           f"--master-port={free_port()}", "-m", "uvclab", "compress", "--out", str(out), *args] + \
        sum((["--set", s] for s in ["batch_size=32"] + QUICK), [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)


def wait(proc, timeout=500) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("torchrun hung:\n" + proc.communicate()[0][-3000:])


def search_records(out) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return sum(json.loads(line)["stage"] == "search" for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
@pytest.mark.parametrize("target", ["torchrun", "rank1"])
def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step_and_resume_equals_uninterrupted(tmp_path, target):
    """SIGTERM to torchrun (it forwards it to every worker) or to the worker of rank 1 alone: both ranks stop
    after the same step, rank 0 writes the checkpoint, the workers exit 75; `--resume` ends as uninterrupted."""
    from test_runfiles import worker_pid
    ref = tmp_path / "ref"
    log = wait(torchrun(ref))
    assert (ref / "report.json").exists(), log[-3000:]
    at = random.Random().randint(2, SEARCH_STEPS - 1)  # search records seen before the signal is sent
    out = tmp_path / "run"
    proc, deadline = torchrun(out), time.time() + 400
    while search_records(out) < at:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.01)
    os.kill(proc.pid if target == "torchrun" else worker_pid(proc.pid, 1), signal.SIGTERM)
    log = wait(proc)
    assert proc.returncode != 0 and log.count("uvclab: Stopped by SIGTERM") == 1, log[-3000:]
    if target == "rank1":  # rank 0 did not get the signal: it stopped on rank 1's word
        assert "exitcode  : 75" in log or "exitcode: 75" in log, log[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    done = 6 * ckpt["epoch"] + ckpt["step"]
    assert ckpt["stage"] == "search" and done >= at and search_records(out) == done  # no step after the checkpoint
    log = wait(torchrun(out, "--resume"))
    assert (out / "report.json").exists(), log[-3000:]
    assert_same_run(out, ref)


# ---- papermill --------------------------------------------------------------------------------------

NOTEBOOK = """
import os, signal
from uvclab.engine import distill
from uvclab.engine.compress import compress
from uvclab.engine.config import load_config
real, calls = distill.distillation_loss, [0]
def loss(*a, **k):  # the scheduler's SIGTERM, sent to the kernel in the middle of step `kill_at`
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
distill.distillation_loss = loss
report = compress(load_config(overrides=quick), out, resume="auto")
"""


@pytest.mark.slow
def test_a_papermill_run_stopped_by_sigterm_fails_its_cell_and_continues_when_executed_again(tmp_path,
                                                                                              tmp_path_factory):
    import nbformat
    ref = reference(tmp_path_factory.getbasetemp())
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("out, kill_at, quick = '', 0, []"),
                                         nbformat.v4.new_code_cell(NOTEBOOK)])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3 (ipykernel)"}
    nbformat.write(nb, tmp_path / "job.ipynb")
    out, step = tmp_path / "run", random.Random().randint(1, SEARCH_STEPS + FINETUNE_STEPS)

    def papermill(kill_at):
        cmd = [sys.executable, "-m", "papermill", str(tmp_path / "job.ipynb"), str(tmp_path / f"out{kill_at}.ipynb"),
               "-p", "out", str(out), "-p", "kill_at", str(kill_at), "-y", json.dumps({"quick": QUICK})]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))

    r = papermill(step)
    assert r.returncode != 0 and "Preempted" in r.stderr and "Stopped by SIGTERM" in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 6 * ckpt["epoch"] + ckpt["step"] + (SEARCH_STEPS if ckpt["stage"] == "finetune" else 0) == step
    r = papermill(0)  # executed again, as a scheduler would: resume="auto" continues
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(out, ref)
