"""How values are written in the tables, and the small path and sorting helpers every part uses."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

# A value a run does not have (None is a value: a key set to null).
MISSING = object()


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if (value != 0 and abs(value) < 1e-3) or abs(value) >= 1e5:
        return f"{value:.2e}"
    return f"{value:.3f}"


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def natural_key(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def is_below(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def common_parent(paths: Sequence[Path]) -> Path:
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return resolved[0].parent
    return Path(os.path.commonpath([str(p) for p in resolved]))


def relative_path(path: Path, parent: Path) -> str:
    try:
        return path.resolve().relative_to(parent).as_posix()
    except ValueError:
        return str(path)


def display_path(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return str(path)


def elide(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + text[len(text) - tail:]


def short_keys(keys: Sequence[str]) -> list[str]:
    """Last part of each dotted key, or the full key where that part is not unique."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [short if last.count(short) == 1 else key for key, short in zip(keys, last)]
