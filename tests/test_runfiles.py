"""Fault tolerance under torchrun: a worker killed with SIGKILL, torchrun restarts the group, the run continues
from its last checkpoint and ends exactly as an uninterrupted run; the resume modes of the run folder."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_compress import QUICK, quick_cfg
from uvclab.engine.runfiles import open_run_folder, save_checkpoint
from uvclab.errors import UvclabError

DDP = ["batch_size=32"] + QUICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(out, rendezvous: str) -> subprocess.Popen:
    """2 CPU workers, one restart allowed; `static`: torchrun's default rendezvous on --master-port,
    `c10d`: the c10d rendezvous on a port the agent picks."""
    rdzv = [f"--master-port={free_port()}"] if rendezvous == "static" else \
        ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1", *rdzv,
           "-m", "uvclab", "compress", "--out", str(out)] + sum((["--set", s] for s in DDP), [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("torchrun hung:\n" + log[-3000:])
    assert proc.returncode == 0, log[-3000:]
    return log


def worker_pid(agent: int, rank: int) -> int:
    """The PID of the torchrun worker of `rank` (a child of the agent whose environment says RANK=rank)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(pid)
    raise LookupError(f"no worker of rank {rank} under {agent}")


def records(out) -> list:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only (being written)
    return [json.loads(line) for line in lines]


def epoch_records(out) -> dict:
    """(stage, epoch) -> the last record of that epoch (a resumed epoch is logged again)."""
    return {(r["stage"], r["epoch"]): r for r in records(out) if "epoch" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "ref"
    finish(torchrun(out, "c10d"))
    return out


class CheckpointWatch:
    """The (stage, epoch) of the run's checkpoint, read again only when the file is replaced."""

    def __init__(self, out):
        self.path, self.inode, self.last = out / "checkpoint.pt", None, (None, 0)

    def __call__(self):
        try:
            inode = self.path.stat().st_ino
            if inode != self.inode:
                ckpt = torch.load(self.path, weights_only=True)
                self.inode, self.last = inode, (ckpt["stage"], ckpt.get("epoch", 0))
        except (OSError, RuntimeError, EOFError):
            pass  # replaced while we read it: look again
        return self.last


# stage -> (rank killed, rendezvous, checkpoints after which the kill lands inside that stage;
# search = 1 warm-up + 2 search epochs, fine-tuning = 2 epochs, then the test and the export)
KILLS = {"search": (1, "static", {("search", 1), ("search", 2)}),
         "finetune": (0, "c10d", {("finetune", 1), ("finetune", 2)})}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
@pytest.mark.parametrize("stage", list(KILLS))
def test_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path, uninterrupted, stage):
    victim, rendezvous, checkpoints = KILLS[stage]
    out = tmp_path / "run"
    proc = torchrun(out, rendezvous)
    watch, deadline = CheckpointWatch(out), time.time() + 300
    while watch() not in checkpoints:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    os.kill(worker_pid(proc.pid, victim), signal.SIGKILL)
    log = finish(proc)
    assert f"uvclab: torchrun restart 1: continuing from '{out / 'checkpoint.pt'}' ({stage}, epoch" in log

    ref = json.loads((uninterrupted / "report.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert {k: v for k, v in report.items() if k != "seconds"} == {k: v for k, v in ref.items() if k != "seconds"}
    for name in ("structure.json", "model/uvclab.json", "uvc_state.json"):
        assert (out / name).read_text() == (uninterrupted / name).read_text(), name
    weights = load_file(out / "model/model.safetensors")
    ref_weights = load_file(uninterrupted / "model/model.safetensors")
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert epoch_records(out) == epoch_records(uninterrupted)
    assert not list(out.glob(".*.tmp"))


# ---- the resume modes (no training) ---------------------------------------------------------------

def test_resume_modes_of_a_run_folder(tmp_path, monkeypatch):
    cfg, out = quick_cfg(), tmp_path / "run"
    with pytest.raises(UvclabError, match="holds no run to continue.*--resume auto"):
        open_run_folder(cfg, out, resume=True)
    assert open_run_folder(cfg, out, resume="auto") is None and (out / "config.yaml").exists()
    save_checkpoint(out / "checkpoint.pt", {"stage": "search", "epoch": 1, "x": torch.arange(3)})
    (out / ".checkpoint.pt.abc.tmp").write_bytes(b"half")  # a worker killed mid-write
    with pytest.raises(UvclabError, match="holds an interrupted run; continue it with --resume"):
        open_run_folder(cfg, out)
    for mode in (True, "auto"):
        assert torch.equal(open_run_folder(cfg, out, resume=mode)["x"], torch.arange(3))
    assert not (out / ".checkpoint.pt.abc.tmp").exists()
    with pytest.raises(UvclabError, match="different config"):
        open_run_folder(quick_cfg("seed=1"), out, resume="auto")
    with pytest.raises(UvclabError, match="resume='maybe'"):
        open_run_folder(cfg, out, resume="maybe")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a torchrun restart continues without --resume
    assert open_run_folder(cfg, out)["epoch"] == 1
    (out / "checkpoint.pt").unlink()  # killed before the first checkpoint: starts over
    assert open_run_folder(cfg, out, resume=True) is None


def test_cli_resume_flag(tmp_path, capsys):
    from uvclab.ui.cli import main
    code = main(["compress", "--out", str(tmp_path / "none"), "--resume"])
    assert code == 2 and "holds no run to continue" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["compress", "--out", str(tmp_path / "x"), "--resume", "later"])


def test_a_restart_continues_only_a_run_this_job_opened(tmp_path, monkeypatch):
    """A first start refused (interrupted run, no --resume) stays refused when torchrun restarts it; once an
    attempt of the job has opened the folder, a restart continues it. The job is the agent's store."""
    from uvclab.engine import loop
    agent = torch.distributed.TCPStore("localhost", 0, is_master=True)
    for k, v in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "localhost",
                 "MASTER_PORT": str(agent.port), "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(loop, "_job_store", [])
    cfg, out = quick_cfg(), tmp_path / "run"
    save_checkpoint(out / "checkpoint.pt", {"stage": "search", "epoch": 2})
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        with pytest.raises(UvclabError, match="holds an interrupted run"):
            open_run_folder(cfg, out)
    assert open_run_folder(cfg, out, resume=True)["epoch"] == 2  # the user continues it (attempt 1 here)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert open_run_folder(cfg, out)["epoch"] == 2  # the next restart continues by itself
    with pytest.raises(UvclabError, match="holds an interrupted run"):  # another folder: not this job's
        save_checkpoint(tmp_path / "other/checkpoint.pt", {"stage": "search", "epoch": 1})
        open_run_folder(cfg, tmp_path / "other")


def test_restarted_ranks_pair_under_a_fresh_prefix_even_when_one_is_late():
    """A restarted rank 1 that asks before rank 0 has started finds the dead attempt's token: it is never
    answered, so rank 1 waits for the new one and both pair under the same new prefix."""
    import threading
    from uvclab.engine.loop import _attempt_prefix
    store = torch.distributed.TCPStore("localhost", 0, is_master=True)
    store.set("uvclab/attempt", "dead")  # left by the previous attempt's rank 0, with its whole handshake
    store.set("uvclab/dead/ack1", "old-rank-1")
    store.set("uvclab/dead/go/old-rank-1", "1")
    got, client = {}, torch.distributed.TCPStore("localhost", store.port, is_master=False)  # one per rank
    late = threading.Thread(target=lambda: got.update(r1=_attempt_prefix(client, 1, 2)))
    late.start()
    time.sleep(0.3)  # rank 1 is polling the stale token
    got["r0"] = _attempt_prefix(store, 0, 2)
    late.join(10)
    assert got["r0"] == got["r1"] != "uvclab/dead/"
