"""Fault injection for the reliability tests: pause points and simulated I/O errors.

Both are driven by environment variables and cost one ``is None`` test when those are unset,
which is always the case outside the tests (the variables are read once, at import).

* ``SO8T_PAUSE_AT=point[@N]`` — at the N-th time (default: the first) the process reaches the
  named pause point, it writes the point's name to the file ``SO8T_PAUSE_FILE`` and sleeps until
  it is killed. A test waits for that file, then sends ``kill -9``: a crash exactly inside one
  phase of a save, which a timer could only hit by luck.
* ``SO8T_FAIL_AT=site[@N[-M]],...`` — hits N to M (``@N``: from N on; nothing: all) of the named write site raise
  ``OSError(SO8T_FAIL_ERRNO)`` (default ``ENOSPC``; ``EROFS`` simulates a read-only folder).
  Sites: ``checkpoint.tensors``, ``checkpoint.state``, ``checkpoint.manifest``,
  ``checkpoint.latest``, ``session``, ``metrics``, ``final``; ``*`` matches every site.

Hand-written: the points sit inside our own save sequence, which no fault-injection library
knows about, and the whole mechanism is these few lines.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

__all__ = ["pause_point", "fail_point", "PAUSE_POINTS", "FAIL_SITES"]

# The phases of a checkpoint save, in order (so8t.checkpoint.store).
PAUSE_POINTS = (
    "save.tmp_created",      # the temporary folder exists, empty
    "save.tensors_written",  # state.safetensors written and fsynced
    "save.state_written",    # state.json written and fsynced
    "save.manifest_written", # MANIFEST.json written and fsynced
    "save.tmp_synced",       # the temporary folder fsynced
    "save.renamed",          # renamed to step_N, the parent not yet fsynced
    "save.committed",        # the parent fsynced: the checkpoint is durable
    "save.latest_written",   # LATEST points at it
)
FAIL_SITES = ("checkpoint.tensors", "checkpoint.state", "checkpoint.manifest", "checkpoint.latest",
              "session", "metrics", "final")


def _parse(spec: str | None) -> dict[str, tuple[int, float]]:
    rules: dict[str, tuple[int, float]] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, hits = item.partition("@")
        first, _, last = hits.partition("-")
        start = int(first) if first else 1
        rules[name] = (start, float(last) if last else float("inf"))
    return rules


_PAUSE_RULES = _parse(os.environ.get("SO8T_PAUSE_AT")) or None
_FAIL_RULES = _parse(os.environ.get("SO8T_FAIL_AT")) or None
_HITS: dict[str, int] = {}


def _hit(rules: dict[str, tuple[int, float]], name: str) -> bool:
    rule = rules.get(name) or rules.get("*")
    if rule is None:
        return False
    count = _HITS[name] = _HITS.get(name, 0) + 1
    return rule[0] <= count <= rule[1]


def pause_point(name: str) -> None:
    """Sleep forever here if ``SO8T_PAUSE_AT`` names this point (see the module docstring)."""
    if _PAUSE_RULES is None or not _hit(_PAUSE_RULES, name):
        return
    marker = os.environ.get("SO8T_PAUSE_FILE")
    if marker:
        Path(marker).write_text(name, encoding="utf-8")
    while True:  # until the test kills the process
        time.sleep(60)


def fail_point(site: str) -> None:
    """Raise the configured ``OSError`` here if ``SO8T_FAIL_AT`` names this site."""
    if _FAIL_RULES is None or not _hit(_FAIL_RULES, site):
        return
    code = getattr(errno, os.environ.get("SO8T_FAIL_ERRNO", "ENOSPC"), errno.ENOSPC)
    raise OSError(code, f"{os.strerror(code)} (injected at {site})")
