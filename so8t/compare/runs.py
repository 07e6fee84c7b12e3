"""Finding the run folders below some paths, and reading one run; a damaged run is reported, never a crash."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from so8t.compare.text import natural_key, short_error
from so8t.run.lock import held_by_live_process
from so8t.run.metrics import read_metrics

# Files whose presence makes a folder look like a run (it then needs a session.json).
RUN_MARKERS = ("session.json", "metrics.jsonl", "checkpoints", "train.log", ".hydra")
MAX_DEPTH = 8  # how far below each PATH to look for runs


class Damaged(Exception):
    """A run file that cannot be read; the message says which and why."""


@dataclass
class Skipped:
    path: Path
    reason: str


@dataclass
class Run:
    path: Path
    experiment: str
    run: str
    status: str | None
    step: int
    max_steps: int | None
    last_checkpoint_step: int | None
    attempts: int
    resumes: int
    training_time: float
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(repr=False, default_factory=list)


# ------------------------------------------------------------------------------------------
# finding runs


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Skipped]]:
    """Run folders below each path (each once) and the folders skipped on the way."""
    runs: list[Path] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name in ("session.json", "metrics.jsonl"):
            path = path.parent
        if not path.exists():
            skipped.append(Skipped(path, "does not exist"))
            continue
        if not path.is_dir():
            skipped.append(Skipped(path, "not a folder"))
            continue
        if not _scan(path, 0, runs, skipped, seen):
            skipped.append(Skipped(path, "no run folder (one with a session.json) below it"))
    return runs, skipped


def _listdir(path: Path) -> list[os.DirEntry] | None:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: natural_key(e.name))
    except OSError:
        return None


def _scan(path: Path, depth: int, runs: list[Path], skipped: list[Skipped], seen: set[Path]) -> bool:
    """Collect runs below ``path``; True when something (a run or a report) was found there."""
    entries = _listdir(path)
    if entries is None:
        skipped.append(Skipped(path, "cannot be listed (permissions?)"))
        return True
    names = {e.name for e in entries}
    if "session.json" in names:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            runs.append(path)
        return True
    if names & set(RUN_MARKERS):
        skipped.append(Skipped(path, "run files but no session.json: it never started training "
                                     "(see its train.log), or it is not an SO8T run"))
        return True
    found = False
    if depth < MAX_DEPTH:
        for entry in entries:
            try:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            found |= _scan(Path(entry.path), depth + 1, runs, skipped, seen)
    if not found and depth > 0 and any(not e.name.startswith(".") for e in entries):
        skipped.append(Skipped(path, "not a run folder and holds none"))
        return True
    return found


# ------------------------------------------------------------------------------------------
# reading one run


def load_run(path: Path, root: Path | None = None) -> Run:
    """Read a run folder; raises :class:`Damaged` naming the file that cannot be read."""
    session = _read_session(path / "session.json")
    config = _read_config(path / ".hydra" / "config.yaml")
    identity = session.get("config_identity")
    if isinstance(identity, dict):
        config.update(identity)  # what the last training attempt actually ran with
    # output.metrics_file, as the run was configured (logger.metrics_file in older runs).
    metrics_file = config.get("output.metrics_file") or config.get("logger.metrics_file") or "metrics.jsonl"
    rows = _read_metrics(path / Path(str(metrics_file)).name)
    experiment, run = _names(path, root, config)
    attempts = [a for a in session.get("attempts") or [] if isinstance(a, dict)]
    last_ckpt = session.get("last_checkpoint")
    status = session.get("status")
    if status == "running" and not held_by_live_process(path):
        status = "killed"
    return Run(
        path=path,
        experiment=experiment,
        run=run,
        status=status,
        step=session.get("global_step") or 0,
        max_steps=session.get("max_steps"),
        last_checkpoint_step=last_ckpt.get("step") if isinstance(last_ckpt, dict) else None,
        attempts=len(attempts),
        resumes=sum(1 for a in attempts if a.get("resumed_from_step") is not None),
        training_time=float(session.get("total_training_time") or 0.0),
        config=config,
        rows=rows,
    )


_SESSION_TYPES = {
    "status": (str, type(None)),
    "global_step": (int, type(None)),
    "max_steps": (int, type(None)),
    "total_training_time": (int, float, type(None)),
    "last_checkpoint": (dict, type(None)),
    "config_identity": (dict, type(None)),
    "attempts": (list, type(None)),
}


def _read_session(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Damaged(f"session.json cannot be read ({short_error(exc)})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Damaged(f"session.json is not valid JSON ({short_error(exc)})") from None
    if not isinstance(data, dict):
        raise Damaged("session.json is not a JSON object")
    for key, types in _SESSION_TYPES.items():
        value = data.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise Damaged(f"session.json: {key!r} has a wrong type ({type(value).__name__})")
    return data


def _read_metrics(file: Path) -> list[dict[str, Any]]:
    """Rows sorted by step, the last row written for a step winning; [] if there is no file."""
    try:
        return read_metrics(file, strict=True)
    except ValueError as exc:
        raise Damaged(str(exc)) from None
    except OSError as exc:
        raise Damaged(f"{file.name} cannot be read ({short_error(exc)})") from None


def _read_config(file: Path) -> dict[str, Any]:
    """Flat ``{"dotted.key": value}`` of a saved Hydra config, interpolations resolved where they
    can be outside the run (a custom resolver that cannot keeps its text)."""
    if not file.exists():
        return {}
    try:
        from omegaconf import OmegaConf

        node = OmegaConf.load(file)
    except Exception as exc:  # noqa: BLE001 - YAML and OmegaConf raise many types
        raise Damaged(f".hydra/config.yaml cannot be read ({short_error(exc)})") from None
    if not OmegaConf.is_dict(node):
        raise Damaged(".hydra/config.yaml is not a mapping")
    flat: dict[str, Any] = {}
    _flatten_config(node, "", flat)
    return flat


def _flatten_config(node: Any, prefix: str, out: dict[str, Any]) -> None:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(node, resolve=False)
    for key in node.keys():
        dotted = f"{prefix}{key}"
        try:
            value = node[key]
            if OmegaConf.is_dict(value):
                _flatten_config(value, dotted + ".", out)
                continue
            if OmegaConf.is_list(value):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation that cannot be resolved here
            value = raw[key]
            if isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
        out[dotted] = value


def _names(path: Path, root: Path | None, config: dict[str, Any]) -> tuple[str, str]:
    """(experiment, run path below the experiment folder)."""
    parts = path.resolve().parts
    for marker, depth in (("runs", 1), ("sweeps", 2)):
        index = len(parts) - 1 - depth
        if index >= 1 and parts[index] == marker:
            experiment = config.get("experiment_name")
            if not isinstance(experiment, str):
                experiment = parts[index - 1]
            return experiment, "/".join(parts[index:])
    experiment = config.get("experiment_name")
    if root is not None:
        try:
            rel = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = path.name
    else:
        rel = path.name
    return (experiment if isinstance(experiment, str) else "?"), (rel if rel != "." else path.name)
