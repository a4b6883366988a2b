"""Atomic file writes: a crash mid-write never leaves a half-written checkpoint, structure or report.

Every writer of a run folder goes through `atomic_write`, which also turns running out of space (ENOSPC, a
quota, or torch.save's '[enforce fail at inline_container.cc] unexpected pos', which loses the errno) into
one `DiskFull` line naming the file, the bytes it needed and the fix. Only the temporary file is lost: the
file's previous version stays as it was. `check_writable` names a read-only run folder before any work.
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
        full = is_disk_full(e, path, size or written)  # judged while the temporary file holds its bytes
        _remove(tmp)
        if full:
            raise disk_full(path, size or written) from e
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


def is_disk_full(e: BaseException, path: Path, size: int) -> bool:
    """Whether writing `size` bytes to `path` failed with `e` for lack of space (or quota)."""
    text = str(e)
    if (isinstance(e, OSError) and e.errno in FULL_ERRNOS) or any(t in text for t in FULL_TEXTS):
        return True
    return isinstance(e, RuntimeError) and any(t in text for t in TORCH_WRITER_TEXTS) and \
        _free(path) < max(size, 1 << 20)


def disk_full(path: Path, size: int) -> DiskFull:
    """The one-line error for `path` (of `size` bytes) that did not fit on its file system."""
    path = Path(path)
    return DiskFull(f"No space left on the file system of '{path}': writing it needs about {_size(size)} and "
                    f"{_size(_free(path))} are free there; nothing was replaced (the previous '{path.name}', if "
                    f"any, is intact). {FIX}")


def _free(path: Path) -> int:
    folder = next((p for p in (Path(path).parent, *Path(path).parents) if p.exists()), Path("."))
    return shutil.disk_usage(folder).free


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
