"""One background thread that writes checkpoints, at most one write in flight.

Training only pays for the in-memory snapshot at the step boundary; serialising, hashing
and fsyncing happen here. A second save waits for the first instead of queueing, so memory
holds at most two snapshots (the one being written and the one just taken) and the order
of commits is the order of saves.

A failure is logged with its traceback at once (the training loop is not listening) and
kept in ``last_error`` so the caller can re-report it; nothing is lost silently.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from so8t.checkpoint.errors import CheckpointError

__all__ = ["AsyncCheckpointWriter"]

logger = logging.getLogger(__name__)


class AsyncCheckpointWriter:
    def __init__(self, name: str = "so8t-checkpoint-writer") -> None:
        # A pool of one rather than a daemon thread: at interpreter exit Python joins it,
        # so a write in progress is finished rather than cut off.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._submit_lock = threading.Lock()
        self._future: Future | None = None
        self._closed = False
        self.last_error: BaseException | None = None  # error of the most recent write
        self.failures = 0  # writes that failed since this writer started

    @property
    def busy(self) -> bool:
        future = self._future
        return future is not None and not future.done()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in the background, after the previous write finished."""
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("AsyncCheckpointWriter is closed")
            self.wait()
            self._future = self._pool.submit(self._run, fn, args, kwargs)
            return self._future

    def wait(self) -> BaseException | None:
        """Block until the write in flight (if any) is done; return its error, if it failed."""
        future = self._future
        if future is None:
            return None
        return future.exception()

    def raise_if_failed(self) -> None:
        """Raise :class:`CheckpointError` if the most recent write failed."""
        self.wait()
        if self.last_error is not None:
            raise CheckpointError(f"background checkpoint write failed: {self.last_error!r}") from self.last_error

    def close(self) -> BaseException | None:
        """Wait for the write in flight, stop the thread, return the last write's error."""
        with self._submit_lock:
            error = self.wait()
            self._closed = True
            self._pool.shutdown(wait=True)
        return error

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.last_error = exc
            self.failures += 1
            # An I/O error (a full disk) is the environment's, and its message says it all; a
            # traceback is kept for what would be a bug.
            logger.error("Background checkpoint write failed: %s", exc, exc_info=not isinstance(exc, OSError))
            raise
        self.last_error = None
        return result
