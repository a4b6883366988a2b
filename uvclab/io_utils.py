"""Atomic file writes (a crash mid-write never leaves a half-written checkpoint, structure or report) and YAML
config files read with clear errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import yaml

from uvclab.errors import UvclabError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the temporary file over `path` (same folder, so rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_yaml(path: Optional[str | Path]) -> dict:
    """A YAML mapping from a file (empty without a path); clear errors for a missing or malformed file."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UvclabError(f"Config file '{p}' does not exist.")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UvclabError(f"Config file '{p}' is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise UvclabError(f"Config file '{p}' must hold a mapping of keys to values.")
    return d
