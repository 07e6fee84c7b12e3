"""Write an output folder atomically: it appears complete under its name, or not at all.

The folder is filled under a dot-named sibling (same file system, so the rename is atomic),
every file and folder is fsynced, then it is renamed into place. Replacing an existing folder
(only when asked) moves the old one aside first, because a folder cannot be renamed over a
non-empty one (nor over any folder on Windows); a failure in between puts the old one back.

Hand-written for the same reason as :mod:`so8t.run.atomic`, which does this for single files.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from so8t.export.errors import ExportError
from so8t.run.atomic import fsync_dir

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def check_output(out: Path, force: bool, protected: Path | None = None) -> Path:
    """Refuse an output folder that exists (unless ``force``), is a file, or would contain or
    sit inside ``protected`` (the source: replacing the output must never delete it)."""
    out = Path(os.path.abspath(out))
    if protected is not None:
        source = Path(os.path.abspath(protected))
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            raise ExportError(f"--out {out} overlaps the source {source}; choose a folder outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ExportError(f"--out {out} exists and is not a folder; choose another path")
        if not force:
            raise ExportError(f"--out {out} already exists; pass --force to replace it")
    return out


def write_dir_atomically(out: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    """Create ``out`` with ``fill(tmp)`` writing its content; replace an existing ``out``
    only if ``force``. On any error nothing under ``out`` has changed and the temporary
    folder is gone."""
    out = check_output(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name}{TMP_MARK}{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot create the output folder next to {out}: {exc}") from exc
    try:
        fill(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}{OLD_MARK}{secrets.token_hex(4)}"
        os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        if aside is not None:
            os.replace(aside, out)
        raise
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    mode = 0o666 & ~_umask()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            # safetensors creates its files 0600; an export is meant to be shared, so files get
            # the mode a plain open() would give them.
            os.chmod(path, mode)
            # "r+b": Windows only flushes a file opened for writing.
            with open(path, "r+b") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def _umask() -> int:
    current = os.umask(0)  # the only portable way to read it is to set it
    os.umask(current)
    return current
