"""metrics.jsonl: one JSON object per line, appended across attempts, safe against crashes.

Each row is written with a single ``write`` and then flushed and fsync'd. One fsync costs
about a millisecond on a local disk, and we write one row per PPO update (hundreds of
milliseconds of work at the very least), so durability costs well under 1 % of the run.

A crash or power cut can leave a partial last line. ``MetricsWriter`` cuts the file back to its
last complete line before appending; ``read_metrics`` skips such a line and keeps only the last
row per ``step``, because after a resume the steps since the last checkpoint are redone and
logged again.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from so8t.run.faults import fail_point

__all__ = ["MetricsWriter", "RENAMED_METRICS", "current_metric_name", "read_metrics"]

log = logging.getLogger(__name__)

# Metric names of earlier versions and their names now (the namespaces are documented in
# docs/checkpoint-format.md). read_metrics gives every row under today's names, so a run
# logged by any version compares with one logged now, and a resumed run reads as one.
RENAMED_METRICS = {
    "approx_kl": "ppo/approx_kl",
    "clip_fraction": "ppo/clip_fraction",
    "entropy": "policy/entropy",
    "grad_norm": "optim/grad_norm",
    "lr": "optim/lr",
    "loss/scale": "optim/loss_scale",
    "loss/policy_loss": "loss/policy",
    "loss/value_loss": "loss/value",
    "episodes": "count/episodes",
    "tokens": "count/tokens",
}


def current_metric_name(name: str) -> str:
    """Today's name of a metric (an old name is mapped; any other is returned as it is)."""
    return RENAMED_METRICS.get(name, name)


def _current_names(row: dict[str, Any]) -> dict[str, Any]:
    if not RENAMED_METRICS.keys() & row.keys():
        return row
    # A name of today wins over an old one should a row hold both.
    renamed = {current_metric_name(k): v for k, v in row.items() if k in RENAMED_METRICS}
    return {**renamed, **{k: v for k, v in row.items() if k not in RENAMED_METRICS}}


class MetricsWriter:
    """Append-only JSON-lines writer. Every row must carry an integer ``step``."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_partial_last_line(self.path)
        self._file: BinaryIO | None = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._pending: list[str] = []  # rows a failed write left to write next time

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row durably. Non-finite floats become null (JSON has no NaN)."""
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        if "step" not in row:
            raise ValueError("a metrics row needs a 'step'")
        self._pending.append(json.dumps(_jsonable(dict(row)), allow_nan=False) + "\n")
        start = self._file.tell()
        try:
            fail_point("metrics")
            self._file.write("".join(self._pending).encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            # A full disk must not end the training (the checkpoints protect it), nor lose the
            # row: it stays pending and goes out with the next one. Cut off what part of it
            # reached the file, so no half row sits in the middle of the record.
            log.error("could not append to %s: %s; %d row(s) kept to write with the next one",
                      self.path, exc, len(self._pending))
            try:
                self._file.seek(start)
                self._file.truncate(start)
            except (OSError, ValueError):
                pass
            return
        self._pending.clear()

    def close(self) -> None:
        if self._file is not None:
            if self._pending:
                log.error("%d metrics row(s) could not be written to %s (steps %s); the steps are "
                          "logged again when a resume redoes them", len(self._pending), self.path,
                          ", ".join(str(json.loads(line)["step"]) for line in self._pending))
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str], strict: bool = False) -> list[dict[str, Any]]:
    """Rows sorted by step, the last written row winning for each step, every metric under its
    current name (:data:`RENAMED_METRICS`). Missing file: [].

    A line that is not a JSON row with an integer ``step`` is skipped with a warning, or, with
    ``strict``, raises ValueError naming the line (for readers that report damaged runs)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    # Whatever follows the last newline is a partial row (or empty): not part of the record.
    by_step: dict[int, dict[str, Any]] = {}
    for number, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            problem = None
        except ValueError:
            row, problem = None, "is not valid JSON"
        step = row.get("step") if isinstance(row, dict) else None
        if problem is None and (not isinstance(step, int) or isinstance(step, bool)):
            problem = "has no integer 'step'"
        if problem is not None:
            if strict:
                raise ValueError(f"metrics.jsonl line {number} {problem}")
            log.warning("%s line %d %s; skipped", path, number, problem)
            continue
        by_step[step] = _current_names(row)
    return [by_step[s] for s in sorted(by_step)]


def _truncate_partial_last_line(path: Path) -> None:
    """If the file does not end with a newline, cut it back to the last one."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "r+b") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last newline; rows are small, so this is short.
        end = size
        keep = 0
        block = 64 * 1024
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s ended with a partial row (a crash mid-write); dropped its %d bytes", path, size - keep)


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy/torch scalars to numbers, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy scalar, 0-d array or 0-d tensor -> Python number
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
