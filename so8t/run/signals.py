"""Graceful stop on signals: the handler only raises a flag; the training loop does the rest.

Saving inside a handler is how the system SO8T replaces corrupted its checkpoints: a handler
runs between two arbitrary bytecodes of the main thread, mid-step, with tensors half updated.
So a handler here only records *which* signal arrived. The loop checks ``requested`` at each
step boundary, writes a checkpoint, and exits with ``exit_code`` (128 + signal number: 130 for
SIGINT, 143 for SIGTERM, 138 for SIGUSR1 on Linux). A signal that arrives during a checkpoint
write just sets the flag; the write finishes first.

Second Ctrl+C = abort now, without saving. On the first stop signal the handler sets SIGINT
back to the OS default action (``SIG_DFL``), so the *next* SIGINT is handled by the kernel and
ends the process immediately. Raising ``KeyboardInterrupt`` or calling ``os._exit`` from a
Python handler would not guarantee that: Python handlers only run between bytecodes of the main
thread, so they wait for a long C call (``torch.save`` of a large tensor, an fsync, a matmul)
to return, and a ``KeyboardInterrupt`` can be swallowed by ``except BaseException`` / ``finally``
cleanup code. Killing the process mid-write is safe because checkpoint commits are atomic: the
partial one stays a temporary folder and older checkpoints stay intact. The process then dies
"by SIGINT" (shell status 130; ``subprocess`` returncode -2) instead of calling ``exit(130)``.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from so8t.exit_codes import signal_exit_code

__all__ = ["StopSignal", "default_stop_signals"]

log = logging.getLogger(__name__)


def default_stop_signals() -> list[int]:
    """SIGINT and SIGTERM everywhere, SIGUSR1 (scheduler pre-emption notice) and SIGBREAK
    (Ctrl+Break on Windows) where the platform has them."""
    sigs = [signal.SIGINT, signal.SIGTERM]
    for name in ("SIGUSR1", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            sigs.append(sig)
    return [int(s) for s in sigs]


class StopSignal:
    """Flag set by stop signals. ``with StopSignal() as stop: ... if stop.requested: save; exit``."""

    def __init__(self, signals: list[int] | None = None):
        self.signals = list(signals) if signals is not None else default_stop_signals()
        self.requested = False
        self.signum: int | None = None  # the first stop signal received
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def name(self) -> str | None:
        """Signal name, e.g. "SIGTERM", or None if no stop was requested."""
        if self.signum is None:
            return None
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int | None:
        """128 + signal number, the shell convention for "ended by signal N"."""
        return None if self.signum is None else signal_exit_code(self.signum)

    def install(self) -> StopSignal:
        """Install the handlers. Outside the main thread Python cannot, so warn and do nothing."""
        if self.installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("StopSignal.install() called outside the main thread: signal handlers not installed")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before ``install()``."""
        for sig, previous in self._previous.items():
            # None means the previous handler was not set from Python; the default is the closest.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only flags and one signal() call: no I/O, no logging (a handler may interrupt the
        # logging module while it holds its own lock), no checkpointing.
        if self.signum is None:
            self.signum = signum
        self.requested = True
        if signal.SIGINT in self._previous:
            # Arm "second Ctrl+C aborts at once" (see module docstring).
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
