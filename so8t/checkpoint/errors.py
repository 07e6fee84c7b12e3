"""The one exception the checkpoint services raise for problems a user must act on."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be used or written, and going on silently would be wrong."""
