"""What to keep: the last ``keep_last`` checkpoints plus milestones, never the newest good one.

Pure: it picks step numbers; the store decides whether a folder is its own to delete.
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["Retention"]


class Retention:
    def __init__(self, keep_last: int, keep_every_steps: int | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every_steps is not None and keep_every_steps < 1:
            raise ValueError(f"keep_every_steps must be >= 1 or null, got {keep_every_steps}")
        self.keep_last = int(keep_last)
        self.keep_every_steps = keep_every_steps

    def is_milestone(self, step: int) -> bool:
        return bool(self.keep_every_steps) and step % self.keep_every_steps == 0

    def select_to_delete(self, steps: Iterable[int], newest_verified: int | None) -> list[int]:
        """Steps to delete, oldest first. ``newest_verified`` is always kept."""
        ordered = sorted(set(steps))
        keep = set(ordered[-self.keep_last :])
        keep.update(s for s in ordered if self.is_milestone(s))
        if newest_verified is not None:
            keep.add(newest_verified)
        return [s for s in ordered if s not in keep]
