"""train.log, written only by the process that holds the run folder.

Hydra opens the job's log file before any of our code runs, so a second process started on a
live run (and refused with exit code 3) would append its lines to the live run's train.log.
:class:`RunLogHandler`, the file handler of ``conf/hydra/default.yaml``, holds its records in
memory until the recipe knows: :func:`open_run_log` once the run lock is taken (the held
records go out first, in order), :func:`discard_run_log` when another live process holds it
(the records still reach the console). A process that never gets that far (a config error)
writes its records when it ends, as a plain file handler would have.
"""

from __future__ import annotations

import logging

__all__ = ["RunLogHandler", "open_run_log", "discard_run_log"]

_MAX_HELD = 10_000  # start-up logs a few dozen lines; this only bounds a runaway


class RunLogHandler(logging.FileHandler):
    def __init__(self, filename, mode: str = "a", encoding: str | None = None, delay: bool = True,
                 errors: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self._held: list[logging.LogRecord] = []
        self._state = "pending"  # pending -> open | discarded

    def emit(self, record: logging.LogRecord) -> None:
        if self._state == "open":
            super().emit(record)
        elif self._state == "pending" and len(self._held) < _MAX_HELD:
            self._held.append(record)

    def open_for_writing(self) -> None:
        if self._state != "pending":
            return
        self._state = "open"
        held, self._held = self._held, []
        for record in held:
            super().emit(record)

    def discard(self) -> None:
        self._state = "discarded"
        self._held = []

    def close(self) -> None:
        self.open_for_writing()
        super().close()


def _handlers() -> list[RunLogHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, RunLogHandler)]


def open_run_log() -> None:
    """This process holds the run folder: write train.log from now on, held records first."""
    for handler in _handlers():
        handler.open_for_writing()


def discard_run_log() -> None:
    """Another live process holds the run folder: never touch its train.log."""
    for handler in _handlers():
        handler.discard()
