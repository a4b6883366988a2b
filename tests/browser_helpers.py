"""Helpers of tests/test_browser.py: a JupyterLab server on loopback, headless Debian Chromium driven by
Playwright, and a deadline so that every wait is bounded.

Nothing here downloads a browser: `bash .ci/install-browser .venv` installs Debian's chromium (apt) and the
`playwright` Python driver (PyPI); the browser is always /usr/bin/chromium.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = Path(os.environ.get("UVCLAB_CHROMIUM", "/usr/bin/chromium"))
# Chromium as this workplace's machines need it: no sandbox (root), and no background connections (the
# network is closed: without these flags Chromium keeps trying to reach Google's hosts).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def browser_unavailable() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run `bash .ci/install-browser .venv` (installs Debian's chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"the Playwright driver is not importable ({e}): run `bash .ci/install-browser .venv`"
    return None


class Deadline:
    """The time left to the whole test; `left(cap)` bounds one wait, `check(what)` fails clearly when past."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        rest = self.end - time.monotonic()
        if rest <= 0:
            raise TimeoutError(f"the browser test ran past its {self.seconds:.0f} s limit")
        return rest if cap is None else min(rest, cap)

    def ms(self, cap: float | None = None) -> float:
        return 1000 * self.left(cap)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """`jupyter lab` on 127.0.0.1 (free port, random token, no browser) serving `root`, in its own process group.

    Its configuration, runtime, settings and workspace folders lie under `home` so that no user setting
    interferes; the lab's news and update notifications are switched off (they would cover the page).
    """

    def __init__(self, root: Path, home: Path, log: Path):
        self.root, self.home, self.log_path = root, home, log
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def start(self, deadline: Deadline, timeout: float = 60) -> None:
        settings = self.home / "lab-settings"
        notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notif.parent.mkdir(parents=True, exist_ok=True)
        notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        # every cell rendered (no windowing): widgets below the fold keep their text readable to the test
        tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True, exist_ok=True)
        tracker.write_text(json.dumps({"windowingMode": "none"}))
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(self.home / "config"),
                   JUPYTER_RUNTIME_DIR=str(self.home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"), PYTHONUNBUFFERED="1")
        env.pop("JUPYTER_DATA_DIR", None)               # kernel specs and lab extensions: the venv's
        env.pop("MPLBACKEND", None)                     # kernels show figures inline, as for a person (CI sets Agg)
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--port-retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--ServerApp.allow_root=True", "--ServerApp.open_browser=False",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--ServerApp.shutdown_no_activity_timeout=600", "--MappingKernelManager.cull_idle_timeout=0"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + deadline.left(timeout)
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer on {self.base} within {timeout:.0f} s:\n{self.log_tail()}")

    def shutdown_kernels(self) -> None:
        """End every session's kernel through the REST API (a notebook given up on stops using the CPU)."""
        try:
            with urllib.request.urlopen(self.url("api/sessions"), timeout=5) as r:
                sessions = json.load(r)
            for s in sessions:
                req = urllib.request.Request(self.url(f"api/sessions/{s['id']}"), method="DELETE")
                urllib.request.urlopen(req, timeout=10).close()
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _children(self) -> list[int]:
        """Pids whose parent is the server: its kernels, which jupyter_client starts in their own sessions."""
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if self.proc is not None and int(fields[1]) == self.proc.pid:
                kids.append(int(stat.parent.name))
        return kids

    def stop(self) -> None:
        """POST /api/shutdown (ends the kernels too); then SIGTERM / SIGKILL to the server's process group and
        SIGKILL to any kernel of it still alive. Bounded: about 20 s at most."""
        if self.proc is None:
            return
        kids = self._children()
        try:
            if self.proc.poll() is None:
                try:
                    urllib.request.urlopen(urllib.request.Request(self.url("api/shutdown"), method="POST"),
                                           timeout=3).close()
                except (urllib.error.URLError, OSError):
                    pass
            for sig, wait in ((None, 8), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                if sig is not None:
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        finally:
            for pid in kids:                         # still alive and still a kernel (not a reused pid)
                try:
                    if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass
            self._log.close()
