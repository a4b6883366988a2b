"""Fetch a dataset that Debian packages, without root: `apt-get download` + `dpkg-deb -x` into a folder.

Debian ships Fashion-MNIST as `dataset-fashion-mnist` (the four IDX .gz files torchvision downloads, in
/usr/share/datasets/fashion-mnist). `apt-get download` needs no root; where the machine's apt lists are empty
(a fresh container) it first refreshes private lists in a temporary folder. This is how an offline machine
that can still reach the package registry gets the data (`engine.data.find_fashion_mnist` calls it after
torchvision's download fails). `run` is injectable so the logic is tested without a network.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from uvclab.errors import UvclabError

FASHION_PACKAGE, FASHION_MEMBER = "dataset-fashion-mnist", "usr/share/datasets/fashion-mnist"


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=600)


def _private_apt_options(tmp: Path) -> list[str]:
    """apt options that keep package lists and downloads in `tmp` (no root, no lock on the system's lists)."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::State::Lists={tmp / 'lists'}", "-o", f"Dir::Cache={tmp / 'cache'}",
            "-o", "Debug::NoLocking=1"]


def _download_deb(package: str, tmp: Path, run: Callable) -> Path:
    """The package's .deb in `tmp`: with the system's apt lists, else with private, freshly updated ones."""
    first = run(["apt-get", "download", package], tmp)
    if first.returncode != 0:
        opts = _private_apt_options(tmp / "apt")
        update = run(["apt-get", "-q", *opts, "update"], tmp)
        second = run(["apt-get", *opts, "download", package], tmp) if update.returncode == 0 else update
        if second.returncode != 0:
            why = (second.stderr or second.stdout or first.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise UvclabError(f"`apt-get download {package}` failed ({why[0]}).")
    debs = sorted(tmp.glob(f"{package}_*.deb"))
    if not debs:
        raise UvclabError(f"`apt-get download {package}` wrote no .deb file in {tmp}.")
    return debs[-1]


def fetch_deb_files(package: str, member: str, target: str | Path, names: Sequence[str],
                    run: Optional[Callable] = None) -> Path:
    """Download Debian `package`, extract it and copy the files `names` of its folder `member` into `target`.

    Files appear in `target` only when all of them were extracted (copied to a temporary name, then renamed).
    Raises UvclabError saying what failed (no apt-get / dpkg-deb, no registry, a package without the files).
    """
    run = run or _run
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise UvclabError(f"{' and '.join(missing)} not found: not a Debian/Ubuntu system, so the Debian package "
                          f"{package} cannot be fetched.")
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix="uvclab-deb-") as tmp_name:
        tmp = Path(tmp_name)
        deb = _download_deb(package, tmp, run)
        extract = run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], tmp)
        if extract.returncode != 0:
            raise UvclabError(f"`dpkg-deb -x {deb.name}` failed ({(extract.stderr or '').strip()[-300:]}).")
        src = tmp / "x" / member
        absent = [n for n in names if not (src / n).is_file()]
        if absent:
            raise UvclabError(f"the package {package} holds no {', '.join(absent)} in /{member}.")
        target.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(src / n, target / f".{n}.part")
        for n in names:
            (target / f".{n}.part").replace(target / n)
    return target
