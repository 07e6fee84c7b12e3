"""When to save: the checkpoint cadence, a pure decision from the step number and a monotonic clock.

The clock is injectable so the cadence can be tested with a fake one, and monotonic by
default so a wall-clock jump (NTP, daylight saving) neither fires nor starves saves.
"""

from __future__ import annotations

import time
from typing import Callable

from so8t.config.schema import Cadence

__all__ = ["SaveCadence", "CADENCE_KINDS"]

CADENCE_KINDS = tuple(kind.value for kind in Cadence)


class SaveCadence:
    """Decide at each step boundary whether a save is due, and why.

    ``kind="time"`` fires once ``every_seconds`` have passed since the last save (or since
    the start); ``kind="step"`` once ``every_steps`` steps have been taken since then;
    ``kind="both"`` whichever comes first. Any save restarts both timers.
    """

    def __init__(
        self,
        kind: str,
        every_seconds: float | None = None,
        every_steps: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        start_step: int = 0,
    ) -> None:
        if kind not in CADENCE_KINDS:
            raise ValueError(f"checkpoint cadence must be one of {CADENCE_KINDS}, got {str(kind)!r}")
        if kind in ("time", "both") and not (every_seconds and every_seconds > 0):
            raise ValueError(f"checkpoint cadence {str(kind)!r} needs every_seconds > 0, got {every_seconds!r}")
        if kind in ("step", "both") and not (every_steps and every_steps > 0):
            raise ValueError(f"checkpoint cadence {str(kind)!r} needs every_steps > 0, got {every_steps!r}")
        self.kind = str(kind)
        self.every_seconds = float(every_seconds) if every_seconds else None
        self.every_steps = int(every_steps) if every_steps else None
        self._clock = clock
        self.mark_saved(start_step)

    @property
    def uses_time(self) -> bool:
        return self.kind in ("time", "both")

    @property
    def uses_steps(self) -> bool:
        return self.kind in ("step", "both")

    def due(self, step: int) -> str | None:
        """``"step"`` or ``"time"`` when a save is due at this boundary, else ``None``."""
        if self.uses_steps and step - self.last_step >= self.every_steps:
            return "step"
        if self.uses_time and self._clock() - self.last_time >= self.every_seconds:
            return "time"
        return None

    def mark_saved(self, step: int) -> None:
        """Restart both timers: a save (or a start/resume) happened at ``step``, now."""
        self.last_step = int(step)
        self.last_time = self._clock()

    def seconds_until_due(self) -> float | None:
        """Seconds left on the time timer (``None`` without one); handy for progress bars."""
        if not self.uses_time:
            return None
        return max(0.0, self.every_seconds - (self._clock() - self.last_time))
