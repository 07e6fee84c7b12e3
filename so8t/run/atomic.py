"""Atomic small-file writes: a reader sees the old content or the new one, never half of either.

Recipe: write a temporary file in the *same* folder (``os.replace`` is only atomic within one
file system), flush and fsync it, ``os.replace`` it over the target, then fsync the folder so
the rename itself survives a power cut. Windows cannot open a folder for fsync; there the
rename is the best we get.

Hand-written rather than a library: the recipe is ten lines, and the popular helpers either
skip the folder fsync or create the temp file with mode 0600 (which would make a shared run
folder unreadable to colleagues).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from so8t.run.faults import fail_point

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir"]

_IS_WINDOWS = os.name == "nt"
# What a file system answers when it cannot fsync a folder at all.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, getattr(errno, "ENOTSUP", errno.EINVAL),
                          getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (new, renamed or removed names) to disk. No-op on Windows."""
    if _IS_WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (certain network mounts) do not implement fsync on a folder; the
        # data files themselves were synced, so carry on. Any other error (EIO: the disk lost
        # the write) means the rename may not survive a power cut, and must be reported.
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fault_site: str | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably. ``fault_site``: the name under
    which the reliability tests can make this write fail (so8t.run.faults)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique dot-name in the same folder: hidden from globs like "*.json", unique per writer.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide the final mode, as a plain open() would.
    # O_BINARY stops Windows from turning "\n" into "\r\n".
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if fault_site is not None:
                fail_point(fault_site)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8", *,
                      fault_site: str | None = None) -> None:
    """Replace ``path`` with ``text`` atomically and durably."""
    atomic_write_bytes(path, text.encode(encoding), fault_site=fault_site)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      fault_site: str | None = None) -> None:
    """Write ``obj`` as JSON atomically. NaN/inf are refused (they are not JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n", fault_site=fault_site)


def _replace(src: Path, dst: Path) -> None:
    # On Windows os.replace fails with PermissionError while another process (a reader,
    # an indexer, an antivirus scan) has the target open; that is brief, so retry a little.
    attempts = 10 if _IS_WINDOWS else 1
    for i in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))
