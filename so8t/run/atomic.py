"""Atomic writes of files and folders: a reader sees the old content or the new one, never half
of either, and a power cut after the write keeps the new one.

Files. Recipe: write a temporary file in the *same* folder (``os.replace`` is only atomic within one
file system), flush and fsync it, ``os.replace`` it over the target, then fsync the folder so
the rename itself survives a power cut. Windows cannot open a folder for fsync; there the
rename is the best we get.

Hand-written rather than a library: the recipe is ten lines, and the popular helpers either
skip the folder fsync or create the temp file with mode 0600 (which would make a shared run
folder unreadable to colleagues).

Folders (a run's ``final/``, an ``so8t-export`` output, a checkpoint). Recipe: fill a dot-named
sibling folder (same file system, so the rename is atomic), fsync every file and folder in it,
move an existing target aside (a folder cannot be renamed over a non-empty one, nor over any on
Windows), rename the new one into place, fsync the parent, then remove the old one. A crash in
between leaves the old folder aside, complete; :func:`recover_dir` puts it back. Hand-written
for the same reason as the files: no library does the folder fsyncs.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from so8t.run.faults import fail_point

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_tree",
           "recover_dir", "remove_tree", "replace_path", "swap_dir_in", "write_dir_atomically"]

log = logging.getLogger(__name__)

# The siblings of a folder being written: "." so they never match a glob of real names.
TMP_MARK = ".tmp-"  # the new folder while it is filled
OLD_MARK = ".old-"  # the previous folder while the new one is renamed into place

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
        replace_path(tmp, path)
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


def replace_path(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace`` (a file, or a folder onto a free name), retried briefly on Windows."""
    # On Windows os.replace fails with PermissionError while another process (a reader,
    # an indexer, an antivirus scan) has the target or a file inside open; that is brief, so
    # retry a little.
    attempts = 10 if _IS_WINDOWS else 1
    for i in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file below ``root``, then every folder, deepest first and ``root`` last, so
    that renaming ``root`` into place can only ever expose durable content."""
    folders = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            # "r+b": Windows only flushes a file opened for writing.
            with open(os.path.join(folder, name), "r+b") as f:
                os.fsync(f.fileno())
        folders.append(folder)
    for folder in reversed(folders):
        fsync_dir(folder)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Best-effort removal of a leftover folder or file; a failure is logged (the next
    cleanup retries), never raised: what matters was already committed."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("Could not remove %s: %s", path, exc)


def swap_dir_in(tmp: str | os.PathLike[str], target: str | os.PathLike[str], aside: str | os.PathLike[str], *,
                renamed: Callable[[], None] | None = None) -> None:
    """Rename the complete, fsynced folder ``tmp`` to ``target`` and make the rename durable.

    An existing ``target`` is first moved to ``aside`` (a free name in the same folder) and put
    back if the rename fails; once the new folder is in and the parent fsynced, the old one is
    removed. ``renamed`` runs right after the rename, before the parent's fsync (a hook for
    the crash tests)."""
    tmp, target, aside = Path(tmp), Path(target), Path(aside)
    moved_aside = False
    if target.exists() or target.is_symlink():
        replace_path(target, aside)
        moved_aside = True
    try:
        replace_path(tmp, target)
    except BaseException:
        if moved_aside:
            replace_path(aside, target)
        raise
    if renamed is not None:
        renamed()
    fsync_dir(target.parent)
    if moved_aside:
        remove_tree(aside)


def recover_dir(target: str | os.PathLike[str]) -> None:
    """Undo what an interrupted :func:`write_dir_atomically` of ``target`` left: its temporary
    folders are removed; a previous ``target`` left aside is put back if ``target`` is missing
    (the crash came between the two renames), else removed."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    leftovers = sorted(parent.glob(f".{glob.escape(target.name)}{TMP_MARK}*"))
    asides = sorted(parent.glob(f".{glob.escape(target.name)}{OLD_MARK}*"), key=lambda p: p.stat().st_mtime)
    if asides and not (target.exists() or target.is_symlink()):
        log.warning("Restoring %s, left aside by an interrupted replacement", target)
        replace_path(asides.pop(), target)
        fsync_dir(parent)
    for path in leftovers + asides:
        log.warning("Removing %s, left by an interrupted write of %s", path, target.name)
        remove_tree(path)


def write_dir_atomically(target: str | os.PathLike[str], fill: Callable[[Path], None], *,
                         replace: bool = True) -> Path:
    """Create ``target`` with ``fill(tmp)`` writing its content into an empty folder; an
    existing ``target`` is replaced only if ``replace`` (else FileExistsError). On any error
    ``target`` is as it was and the temporary folder is gone."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    if not replace and (target.exists() or target.is_symlink()):
        raise FileExistsError(f"{target} already exists")
    token = secrets.token_hex(4)
    tmp = parent / f".{target.name}{TMP_MARK}{token}"
    tmp.mkdir()
    try:
        fill(tmp)
        fsync_tree(tmp)
        swap_dir_in(tmp, target, parent / f".{target.name}{OLD_MARK}{token}")
    except BaseException:
        remove_tree(tmp)
        raise
    return target
