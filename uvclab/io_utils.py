"""Atomic file writes: a crash mid-write never leaves a half-written checkpoint, structure or report.

Every writer of a run folder goes through `atomic_write`, which also turns a failed write into one clear
line: out of space (ENOSPC, a quota, or torch.save's '[enforce fail at inline_container.cc] unexpected pos',
which loses the errno) is a `DiskFull` naming the file, the bytes it needed and the fix; a read-only folder
is a `UvclabError`. Only the temporary file is lost: the file's previous version stays as it was.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from uvclab.errors import DiskFull, UvclabError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")  # safetensors' Rust io::Error
TORCH_WRITER_TEXTS = ("inline_container", "PytorchStreamWriter")  # torch.save's C++ writer: no errno
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
FIX = "Free space or move the run folder, then --resume."


def atomic_write(path: str | Path, write: Callable[[str], None], size: Optional[int] = None) -> None:
    """Call `write(tmp_path)`, then rename the temporary file over `path` (same folder, so rename is atomic).
    size: the bytes being written, if known (named in the out-of-space message; else the bytes written)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        written = os.path.getsize(tmp) if tmp and os.path.exists(tmp) else 0
        error = write_error(e, path, size or written)  # judged while the temporary file still holds its bytes
        _remove(tmp)
        if error is not None:
            raise error from e
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: no half-written file left behind
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))


def _remove(tmp: Optional[str]) -> None:
    if tmp and os.path.exists(tmp):
        os.unlink(tmp)


def write_error(e: BaseException, path: Path, size: int) -> Optional[UvclabError]:
    """The clear error for a failed write of `size` bytes to `path` (None: not a full or read-only disk)."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in FULL_ERRNOS) or any(t in text for t in FULL_TEXTS) or (
        isinstance(e, RuntimeError) and any(t in text for t in TORCH_WRITER_TEXTS) and free < max(size, 1 << 20))
    if full:
        return DiskFull(f"No space left on the file system of '{path}': writing it needs about {_size(size)} and "
                        f"{_size(free)} are free there; nothing was replaced (the previous '{path.name}', if "
                        f"any, is intact). {FIX}")
    if isinstance(e, OSError) and e.errno in READ_ONLY_ERRNOS:
        return UvclabError(f"Cannot write '{path}' ({e.strerror}); the previous version, if any, is intact. Make "
                           "the folder writable (or copy the run folder to a writable place), then --resume.")
    return None


def check_writable(folder: str | Path) -> None:
    """Create `folder` and a file in it, or raise a clear error (a read-only run folder, before any work)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".uvclab-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UvclabError(f"The run folder '{folder}' is not writable ({e.strerror}). Choose a writable --out; to "
                          "continue an interrupted run, copy its folder there and use --resume.") from e


def payload_bytes(obj) -> int:
    """The bytes of the tensors, arrays and strings in a nested dict/list (the size estimate of a checkpoint)."""
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    if hasattr(obj, "nbytes"):  # numpy arrays; torch tensors have it too
        return int(obj.nbytes)
    return len(obj) if isinstance(obj, (str, bytes)) else 8


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB ({n:,} bytes)" if n >= 2 ** 20 else f"{n:,} bytes"
