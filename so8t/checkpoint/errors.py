"""The one exception the checkpoint services raise for problems a user must act on.

It is defined in so8t.errors, which imports nothing heavy, so the recipe can catch it
without importing torch."""

from __future__ import annotations

from so8t.errors import CheckpointError

__all__ = ["CheckpointError"]
