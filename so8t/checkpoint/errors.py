"""The exceptions the checkpoint services raise for problems a user must act on.

CheckpointError is defined in so8t.errors, which imports nothing heavy, so the recipe can catch
it without importing torch; so does this module."""

from __future__ import annotations

from so8t.errors import CheckpointError

__all__ = ["CheckpointError", "CheckpointingStalledError", "OwnershipLostError"]


class CheckpointingStalledError(CheckpointError):
    """Saves keep failing (or being skipped for lack of space): the run would go on training
    with nothing to resume from, so it stops instead (exit code 74 from so8t-train)."""


class OwnershipLostError(CheckpointError):
    """A newer writer took the run folder over (its owner token replaced ours): this process must
    stop writing at once, so the two never interleave commits (exit code 3 from so8t-train)."""
