"""session.json: the story of one run across all the processes that worked on it.

Layout::

    {
      "status": "running" | "completed" | "interrupted" | "failed",
      "global_step": 120, "max_steps": 500,
      "total_training_time": 73.4,      # active seconds, supplied by the trainer (see update())
      "last_checkpoint": {"step": 120, "path": "...", "reason": "time"} | null,
      "config_identity": ...,           # whatever the trainer uses to recognise its config
      "failed_saves": 0, "skipped_saves": 0,  # checkpoint saves that did not commit, all attempts
      "updated": "2025-...",            # last write: the last sign of life of a killed attempt
      "attempts": [
        {"index": 1, "started": "...", "ended": "...", "end_reason": "SIGTERM",
         "exit_code": 143, "resumed_from_step": 0, "host": "...", "pid": 4242,
         "code_version": "<git sha>[-dirty] | <package version>", "status": "interrupted",
         "active_seconds": 40.2, "failed_saves": 0, "skipped_saves": 0, "failures_in_row": 0},
        ...
      ]
    }

Every write is atomic (temp file + fsync + rename), so a reader — or the next attempt after a
power cut — finds either the previous or the new version.

An attempt still marked "running" when the next one starts was never closed: its process died
without running any code (``kill -9``, OOM killer, power cut, or a second Ctrl+C). It is then
closed as ``status: interrupted, end_reason: killed`` with ``ended`` set to the file's last
update time.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from so8t.run.atomic import atomic_write_json

__all__ = ["RUN_STATUSES", "CHECKPOINT_REASONS", "SessionFile", "code_version"]

log = logging.getLogger(__name__)

RUN_STATUSES = ("running", "completed", "interrupted", "failed")
CHECKPOINT_REASONS = ("time", "step", "signal", "deadline", "end")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _fresh() -> dict[str, Any]:
    return {
        "status": None,
        "global_step": 0,
        "max_steps": None,
        "total_training_time": 0.0,
        "last_checkpoint": None,
        "config_identity": None,
        "updated": None,
        "attempts": [],
    }


class SessionFile:
    """Reads and writes ``run_dir/session.json``.

    ``update()`` is meant for every step: it rewrites the file at most every
    ``min_write_interval`` seconds (and always when a new checkpoint is reported), so a run with
    fast steps does not pay an fsync per step. The lag after a ``kill -9`` is at most that
    interval; the checkpoint, not this file, is what resume relies on.
    """

    FILENAME = "session.json"

    def __init__(self, run_dir: str | os.PathLike[str], *, min_write_interval: float = 1.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.FILENAME
        self.min_write_interval = min_write_interval
        self.data: dict[str, Any] = _fresh()
        self._attempt: dict[str, Any] | None = None  # this process's attempt entry
        self._attempt_t0 = 0.0  # monotonic clock at start_attempt
        self._last_write = float("-inf")  # monotonic clock of the last write
        self._detached = False

    # -- reading ----------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Read the file. Missing: start fresh. Corrupt: keep it aside as
        ``session.json.corrupt-<timestamp>``, warn, and start fresh."""
        try:
            if self.path.is_symlink():
                raise ValueError("it is a symbolic link")
            data = json.loads(self.path.read_bytes().decode("utf-8"))
            _check_session(data)
        except FileNotFoundError:
            self.data = _fresh()
            return self.data
        except (ValueError, RecursionError, OSError) as err:  # UnicodeDecodeError is a ValueError
            # Only the story of the run is in here (resume relies on the checkpoints), so a
            # damaged file is kept for a person to read and a fresh one started.
            backup = self.path.with_name(f"{self.FILENAME}.corrupt-{datetime.now():%Y%m%d-%H%M%S}")
            try:
                os.replace(self.path, backup)
                where = f"moved it to {backup.name}"
            except OSError as exc:
                where = f"could not move it aside ({exc})"
            log.warning("%s is unreadable (%s); %s and starting a fresh session file",
                        self.path, str(err)[:200], where)
            self.data = _fresh()
            return self.data
        self.data = {**_fresh(), **data}
        return self.data

    @property
    def attempt_index(self) -> int | None:
        """Index of this process's attempt, once started."""
        return None if self._attempt is None else self._attempt["index"]

    # -- writing ----------------------------------------------------------------------------

    def start_attempt(self, max_steps: int, config_identity: Any, resumed_from_step: int) -> int:
        """Open a new attempt for this process (status running). Returns its 1-based index."""
        self.load()
        attempts = self.data["attempts"]
        for prev in attempts:
            if prev.get("status") == "running":
                # Never closed: the process died without running any code.
                prev.update(status="interrupted", end_reason="killed", exit_code=None,
                            ended=self.data.get("updated"))
                log.warning("attempt %s (pid %s on %s) ended without closing the session file: "
                            "recorded as killed", prev.get("index"), prev.get("pid"), prev.get("host"))
        index = max((a.get("index", 0) for a in attempts), default=0) + 1
        self._attempt = {
            "index": index,
            "started": _now(),
            "ended": None,
            "end_reason": None,
            "exit_code": None,
            "resumed_from_step": resumed_from_step,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "code_version": code_version(),
            "status": "running",
            "active_seconds": 0.0,
        }
        attempts.append(self._attempt)
        self._attempt_t0 = time.monotonic()
        self.data.update(status="running", max_steps=max_steps, config_identity=config_identity,
                         global_step=resumed_from_step)
        self._write()
        return index

    def update(self, global_step: int, total_training_time: float,
               last_checkpoint: dict[str, Any] | None = None) -> None:
        """Record progress. ``total_training_time`` is the trainer's counter of active seconds;
        it is saved in checkpoints and restored on resume, so gaps between attempts never count.
        ``last_checkpoint`` is ``{"step", "path", "reason"}`` right after a checkpoint commits."""
        self._require_attempt()
        self.data["global_step"] = global_step
        self.data["total_training_time"] = round(float(total_training_time), 3)
        new_checkpoint = last_checkpoint is not None and last_checkpoint != self.data["last_checkpoint"]
        if new_checkpoint:
            reason = last_checkpoint.get("reason")
            if reason not in CHECKPOINT_REASONS:
                raise ValueError(f"checkpoint reason {reason!r} is not one of {CHECKPOINT_REASONS}")
            self.data["last_checkpoint"] = dict(last_checkpoint)
        if new_checkpoint or time.monotonic() - self._last_write >= self.min_write_interval:
            self._write()

    def end_attempt(self, status: str, end_reason: str, exit_code: int | None) -> None:
        """Close this process's attempt and set the run status.

        Suggested ``end_reason`` values: "end" (max_steps reached), the signal name ("SIGINT",
        "SIGTERM", "SIGUSR1", "SIGBREAK"), "deadline", "exception".
        """
        self._require_attempt()
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"end status must be one of completed/interrupted/failed, not {status!r}")
        self._attempt.update(status=status, end_reason=end_reason, exit_code=exit_code, ended=_now())
        self.data["status"] = status
        self._write()

    def set_checkpoint_stats(self, stats: dict[str, int]) -> None:
        """Counts of checkpoint saves of this attempt that failed or were skipped; the run's
        totals over all attempts go to the top level (``failed_saves``, ``skipped_saves``)."""
        self._require_attempt()
        if all(self._attempt.get(k) == v for k, v in stats.items()):
            return
        self._attempt.update(stats)
        for key in ("failed_saves", "skipped_saves"):
            self.data[key] = sum(a.get(key, 0) for a in self.data["attempts"]
                                 if isinstance(a.get(key, 0), int))
        self._write()

    def detach(self) -> None:
        """Write nothing more: another process owns the run folder now (see RunLock.check_owner)."""
        self._detached = True

    def flush(self) -> None:
        """Write now, whatever the interval (e.g. right before a long pause)."""
        self._write()

    def _require_attempt(self) -> None:
        if self._attempt is None:
            raise RuntimeError("call start_attempt() first")

    def _write(self) -> None:
        if self._detached:
            return
        if self._attempt is not None:
            self._attempt["active_seconds"] = round(time.monotonic() - self._attempt_t0, 3)
        self.data["updated"] = _now()
        try:
            atomic_write_json(self.path, self.data, fault_site="session")
        except OSError as exc:
            # The story of the run, not what resume relies on: a full disk here must not end
            # the training; the next update tries again.
            log.error("could not write %s: %s (the checkpoints are what resume relies on; retrying "
                      "at the next update)", self.path, exc)
            return
        self._last_write = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the current content (for tests and reports)."""
        return copy.deepcopy(self.data)


def _check_session(data: Any) -> None:
    """Raise ValueError unless ``data`` has the shape this module reads and writes."""
    if not isinstance(data, dict):
        raise ValueError("not a session object")
    attempts = data.get("attempts", [])
    if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
        raise ValueError("attempts is not a list of objects")
    for attempt in attempts:
        index = attempt.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"attempt index {index!r} is not a number")
    for key, kinds in (("global_step", (int, type(None))), ("total_training_time", (int, float)),
                       ("status", (str, type(None))),
                       ("last_checkpoint", (dict, type(None)))):
        if key in data and (not isinstance(data[key], kinds) or isinstance(data[key], bool)):
            raise ValueError(f"{key} has the wrong type")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Git sha of the so8t source tree (``-dirty`` if it has uncommitted changes), else the
    installed package version. Computed once per process."""
    pkg_dir = Path(__file__).resolve().parents[1]  # .../so8t
    sha = _git(pkg_dir, "rev-parse", "HEAD")
    toplevel = _git(pkg_dir, "rev-parse", "--show-toplevel")
    # Only trust a repository that *is* the so8t checkout: an installed copy in a virtualenv
    # that happens to sit inside some other git repo must not report that repo's sha.
    if sha and toplevel and Path(toplevel).resolve() == pkg_dir.parent:
        dirty = _git(pkg_dir, "status", "--porcelain", "--untracked-files=no", "--", ".")
        return sha + ("-dirty" if dirty else "")
    try:
        from importlib.metadata import version

        return version("so8t")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a source tree): best effort
        return "unknown"


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or too slow
    return out.stdout.strip() if out.returncode == 0 else None
