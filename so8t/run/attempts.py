"""Per-attempt copies of Hydra's config files.

Hydra rewrites ``run_dir/.hydra/{config,hydra,overrides}.yaml`` each time a job starts in the
same folder, so after a resume with a new override (say ``max_steps=2000``) the old
overrides would be gone. ``archive_hydra_config`` copies them into ``run_dir/attempts/NNN/``
once per attempt, so the history of what each process ran with is kept.

Call it *after* taking the run lock: a process refused by the lock must not add an entry.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["archive_hydra_config", "next_attempt_number"]

log = logging.getLogger(__name__)

ATTEMPTS_DIR = "attempts"


INCOMING_DIR = ".hydra-incoming"  # where Hydra writes first (conf/hydra/default.yaml)
_STALE_SECONDS = 600  # an incoming record older than this belongs to a process long gone


def adopt_hydra_files(run_dir: str | os.PathLike[str], incoming: str | None) -> None:
    """Make this process's Hydra record (``incoming``, relative to ``run_dir``) the run's
    ``.hydra/``. Call it only while holding the run lock. Old leftovers of other processes
    (killed, or refused by the lock) are removed."""
    run_dir = Path(run_dir)
    if not incoming or Path(incoming).name == ".hydra":
        return
    source = run_dir / incoming
    if source.is_dir():
        target = run_dir / ".hydra"
        if target.exists():
            aside = run_dir / f".hydra-old-{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(source, target)
    root = run_dir / INCOMING_DIR
    if root.is_dir():
        import time

        for stale in root.iterdir():
            try:
                if time.time() - stale.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            root.rmdir()  # only when empty
        except OSError:
            pass


def discard_hydra_files(run_dir: str | os.PathLike[str], incoming: str | None) -> None:
    """Remove this process's own Hydra record (refused by the lock: the run is another's)."""
    if incoming and Path(incoming).name != ".hydra":
        shutil.rmtree(Path(run_dir) / incoming, ignore_errors=True)
        try:
            (Path(run_dir) / INCOMING_DIR).rmdir()
        except OSError:
            pass


def next_attempt_number(run_dir: str | os.PathLike[str]) -> int:
    """1 + the highest existing ``attempts/NNN`` number (1 for the first attempt)."""
    root = Path(run_dir) / ATTEMPTS_DIR
    numbers = [int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return max(numbers, default=0) + 1


def archive_hydra_config(run_dir: str | os.PathLike[str]) -> Path | None:
    """Copy ``run_dir/.hydra/*.yaml`` into ``run_dir/attempts/NNN/`` and return that folder.

    Returns None (and archives nothing) when there is no ``.hydra`` folder, e.g. when the
    trainer is driven from Python without Hydra's run-dir management.
    """
    run_dir = Path(run_dir)
    hydra_dir = run_dir / ".hydra"
    files = sorted(hydra_dir.glob("*.yaml")) if hydra_dir.is_dir() else []
    if not files:
        log.debug("no %s/*.yaml to archive", hydra_dir)
        return None
    root = run_dir / ATTEMPTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of a copy interrupted by a crash: incomplete, never numbered, safe to drop.
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    number = next_attempt_number(run_dir)
    target = root / f"{number:03d}"
    # Copy into a temporary name and rename, so a numbered folder is always complete.
    tmp = root / f".tmp-{number:03d}-{os.getpid()}"
    tmp.mkdir()
    for f in files:
        shutil.copy2(f, tmp / f.name)
    os.replace(tmp, target)
    log.info("archived Hydra config of this attempt to %s", target)
    return target
