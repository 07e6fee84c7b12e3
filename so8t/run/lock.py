"""Single-writer lock for a run folder.

Mechanism: an operating-system lock (``flock`` on Unix, ``LockFileEx`` on Windows) taken
through the ``filelock`` package on ``run_dir/.lock.os``, plus a JSON holder record in
``run_dir/.lock`` ({pid, host, started, argv}) that only serves the error message.

Why an OS lock and not an ``O_CREAT|O_EXCL`` marker file with a pid liveness check:

* the kernel drops the lock when the holder dies *in any way* — exception, ``kill -9``, OOM
  killer, power cut (locks do not survive a reboot) — so "a lock left by a dead process never
  blocks" holds by construction, with no pid check that pid reuse could fool;
* the same holds across hosts on a network file system with working locks (NFS), where a pid
  cannot be checked at all and a marker-file scheme would block a requeued job forever;
* taking over a stale marker file is racy (two newcomers both judge it stale, both replace it);
  an OS lock has no takeover step to get wrong.

``filelock`` rather than raw ``fcntl``/``msvcrt``: one portable API, and on file systems
without ``flock`` it falls back to its own marker-file lock with a warning.

The holder record lives in a separate file because Windows byte-range locks are mandatory: a
second process could not read a record kept inside the locked file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import filelock
import psutil

from so8t.run.atomic import atomic_write_json

__all__ = ["RunLock", "RunLockedError", "RunLockUnavailableError", "held_by_live_process", "read_lock_holder"]

log = logging.getLogger(__name__)

LOCK_INFO_NAME = ".lock"  # JSON holder record: what a person or tool reads
OWNER_NAME = ".owner"  # the owner token: the fence every commit checks (see check_owner)
OS_LOCK_NAME = ".lock.os"  # the file the OS lock is taken on (content unused, never deleted)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""

    def __init__(self, run_dir: Path, holder: dict[str, Any] | None):
        self.run_dir = run_dir
        self.holder = holder or {}
        if holder:
            who = (
                f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(started {holder.get('started', '?')})"
            )
            argv = holder.get("argv")
            if argv:
                who += f", command: {' '.join(map(str, argv))}"
        else:
            # The holder took the OS lock but has not written its record yet (a few ms window).
            who = "another process (its holder record is not written yet)"
        super().__init__(
            f"run dir {run_dir} is in use by {who}. Two processes must never write one run; "
            f"stop that one first (or wait for it). The lock is released automatically when "
            f"its process ends, however it ends."
        )


class RunLockUnavailableError(RuntimeError):
    """No lock can be taken on the run folder (the file system refuses, the lock file is not a
    plain file …): running unprotected against a second writer is not an option."""

    def __init__(self, run_dir: Path, error: BaseException):
        super().__init__(
            f"cannot take the single-writer lock on {run_dir / OS_LOCK_NAME}: {error}. Without it a second "
            "process could write this run at the same time. If that path is not a plain file, remove it; "
            "otherwise put the outputs on a file system that supports locking (paths.output_dir=...)."
        )


class RunLock:
    """Exclusive, non-blocking lock on a run folder. Use as a context manager or acquire/release."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.info_path = self.run_dir / LOCK_INFO_NAME
        # thread_local=False: the lock belongs to the process, so any thread (say, a cleanup
        # hook) may release it. filelock also closes the descriptor in forked children, so an
        # orphaned DataLoader worker cannot keep a dead run locked.
        self._os_lock = filelock.FileLock(self.run_dir / OS_LOCK_NAME, thread_local=False)
        self._info: dict[str, Any] | None = None
        self.token: str | None = None

    @property
    def held(self) -> bool:
        return self._info is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` at once (never waits)."""
        if self.held:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._os_lock.acquire(blocking=False)
        except filelock.Timeout:
            raise RunLockedError(self.run_dir, self.read_holder()) from None
        except (OSError, NotImplementedError) as exc:
            raise RunLockUnavailableError(self.run_dir, exc) from exc

        # We own the OS lock, so any record still on disk belongs to a process that is gone.
        previous = self.read_holder()
        if previous is not None:
            log.warning(
                "taking over run dir %s: previous holder pid %s on host %s (started %s) "
                "ended without releasing it (killed or crashed)",
                self.run_dir, previous.get("pid"), previous.get("host"), previous.get("started"),
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": list(sys.argv),
        }
        # Fencing: on a file system whose locks do not exclude (some network mounts), two
        # processes could both get here. Each writes a fresh token; the newer one wins, and the
        # older finds out at its next commit (check_owner) and stops instead of interleaving.
        self.token = secrets.token_hex(16)
        try:
            atomic_write_json(self.info_path, info)
            atomic_write_json(self.run_dir / OWNER_NAME, {"token": self.token, **info})
        except BaseException:
            self._os_lock.release()
            raise
        self._info = info

    def check_owner(self) -> None:
        """Raise OwnershipLostError unless this process's token is still the run folder's."""
        if not self.held:
            return
        try:
            token = json.loads((self.run_dir / OWNER_NAME).read_text(encoding="utf-8")).get("token")
        except (OSError, ValueError, AttributeError):
            token = None
        if token != self.token:
            from so8t.checkpoint.errors import OwnershipLostError

            raise OwnershipLostError(
                f"another process took over {self.run_dir} (its owner token in {OWNER_NAME} replaced this "
                "process's): this one stops writing now, so the two never interleave their checkpoints. "
                "The file system's locks do not keep writers apart; run one process per run folder."
            )

    def release(self) -> None:
        """Drop the lock; remove the holder record only if it is ours."""
        if not self.held:
            return
        # Remove the record *before* dropping the OS lock: once the lock is free a newcomer
        # writes its own record, which we must not delete.
        current = self.read_holder()
        if current is not None and _same_holder(current, self._info):
            self.info_path.unlink(missing_ok=True)
        self._info = None
        self._os_lock.release()

    def read_holder(self) -> dict[str, Any] | None:
        """The holder record on disk, or None if missing or unreadable."""
        return read_lock_holder(self.run_dir)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock_holder(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record of ``run_dir`` ({pid, host, started, argv}), or None if missing or
    unreadable. Only the OS lock says whether the run is held; this says by whom."""
    try:
        data = json.loads((Path(run_dir) / LOCK_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def held_by_live_process(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the holder record of ``run_dir`` names a live process, for readers such as
    so8t-compare that must not take the lock. A record from another host cannot be checked
    from here and counts as live; no record means no holder (a live run always has one)."""
    holder = read_lock_holder(run_dir)
    if holder is None:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    # psutil rather than os.kill(pid, 0): on Windows os.kill terminates the process it names.
    return psutil.pid_exists(pid)


def _same_holder(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is not None and all(a.get(k) == b.get(k) for k in ("pid", "host", "started"))
