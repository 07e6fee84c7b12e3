"""The exceptions the checkpoint services raise for problems a user must act on.

CheckpointError is defined in so8t.errors, which imports nothing heavy, so the recipe can catch
it without importing torch; so does this module."""

from __future__ import annotations

from so8t.errors import CheckpointError

__all__ = ["CheckpointError", "CheckpointingStalledError"]


class CheckpointingStalledError(CheckpointError):
    """Saves keep failing (or being skipped for lack of space): the run would go on training
    with nothing to resume from, so it stops instead (exit code 74 from so8t-train)."""
