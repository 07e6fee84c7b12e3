"""The run's clock: when this process started, and the ``max_wall_seconds`` deadline.

Both are on ``time.monotonic()``, which no NTP step or daylight-saving change moves, so a
deadline is never hit early (or missed) because the wall clock was set.
"""

from __future__ import annotations

import logging
import time

import psutil

log = logging.getLogger(__name__)

__all__ = ["Deadline", "process_started"]

_HAS_BOOTTIME = hasattr(time, "CLOCK_BOOTTIME")  # Linux


def process_started() -> float:
    """``time.monotonic()`` when this process started, so ``max_wall_seconds`` also counts the
    interpreter and Hydra start-up (seconds on a loaded machine), as a job's clock does.

    psutil gives the start time portably (Linux, macOS, Windows), on the wall clock; its age is
    converted to the monotonic clock here. If it cannot be read, the clock starts now."""
    now_monotonic, now_wall = time.monotonic(), time.time()
    try:
        created = psutil.Process().create_time()
        since_boot = created - psutil.boot_time() if _HAS_BOOTTIME else None
    except (psutil.Error, OSError) as exc:
        log.debug("process start time unavailable (%s): the deadline counts from now", exc)
        return now_monotonic
    if since_boot is not None:
        # Linux: psutil's start time is the kernel's "seconds after boot" plus the boot time,
        # which it reads to the whole second; against the boot clock that rounding cancels,
        # and so does any change of the wall clock since the boot.
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot
    else:
        age = now_wall - created
    # A negative age (the wall clock was set back since the start) says nothing: count from now.
    return now_monotonic - age if age >= 0 else now_monotonic


class Deadline:
    """Stops before ``max_wall_seconds`` with time left for one more update and a save."""

    def __init__(self, max_wall_seconds: float | None, started: float):
        self.limit = max_wall_seconds
        self.started = started
        self.slowest_step = 0.0
        self.slowest_save = 0.0

    def observe_step(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def observe_save(self, seconds: float) -> None:
        self.slowest_save = max(self.slowest_save, seconds)

    def next_step_would_overrun(self) -> bool:
        # Without a measured update there is nothing to go on, and an attempt that stopped
        # before its first update would be requeued forever: every attempt makes one.
        if self.limit is None or self.slowest_step == 0.0:
            return False
        elapsed = time.monotonic() - self.started
        # The measured worst step and save, with a margin for jitter.
        return elapsed + 1.5 * (self.slowest_step + self.slowest_save) + 1.0 > self.limit
