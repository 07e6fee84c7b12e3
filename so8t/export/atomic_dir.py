"""Write an export folder atomically: it appears complete under its name, or not at all.

The folder protocol is :func:`so8t.run.atomic.write_dir_atomically`; this adds what an export
needs on top: refusing an output that exists (unless forced) or overlaps the source, and files
readable by others.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from so8t.export.errors import ExportError
from so8t.run.atomic import write_dir_atomically as _write_dir_atomically


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

    def fill_shared(tmp: Path) -> None:
        fill(tmp)
        _share(tmp)

    try:
        return _write_dir_atomically(out, fill_shared, replace=force)
    except FileExistsError as exc:
        raise ExportError(f"--out {out} already exists; pass --force to replace it") from exc


def _share(root: Path) -> None:
    # safetensors creates its files 0600; an export is meant to be shared, so files get the
    # mode a plain open() would give them.
    mode = 0o666 & ~_umask()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, mode)


def _umask() -> int:
    current = os.umask(0)  # the only portable way to read it is to set it
    os.umask(current)
    return current
