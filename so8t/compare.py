"""``so8t-compare``: every run below some folders, side by side.

::

    so8t-compare outputs/                                   # all experiments, runs and sweeps
    so8t-compare outputs/default/sweeps/lr --sort=-reward/mean --plot rewards.png
    so8t-compare outputs/a outputs/b --metric reward/mean --metric kl/mean --format md
    so8t-compare outputs/ --filter status=completed --filter ppo.clip_range=0.2 --format json

A *run folder* is one that holds a ``session.json`` (single runs in
``<experiment>/runs/<run_name>/``, sweep jobs in ``<experiment>/sweeps/<sweep>/<run_name>/``).
The search goes down from each PATH, skipping hidden folders and never descending into a run.
A folder that holds run files but no ``session.json`` (a job that failed before training), a
folder that holds no run at all, and a run whose ``session.json``, ``metrics.jsonl`` or
``.hydra/config.yaml`` cannot be read are reported on stderr and skipped; the command never
crashes on them. A partial last line of ``metrics.jsonl`` (a crash mid-write) is normal and
ignored.

One row per run: experiment, run path, status, steps done / ``max_steps``, step of the last
checkpoint, number of resumes, training time, the config keys whose values differ across the
selected runs, and for each ``--metric`` the last value and the best one with its step. Config
values come from the run's resolved config: the result-shaping keys as recorded in
``session.json`` by the last attempt that trained, the others (hardware, checkpoint …) from
``.hydra/config.yaml``, so changes made by an experiment preset show, not only the overrides
typed. Metrics come from ``metrics.jsonl``, where the last row of each step wins (steps redone
after a resume count once). ``best`` is the maximum, or the minimum for metrics whose name starts
with ``loss`` or ``time/`` or contains ``kl``; force it with ``--metric NAME:min`` / ``NAME:max``.

Options: ``--metric NAME`` (repeatable; default ``reward/mean``), ``--sort KEY`` (a column:
``experiment run status steps max_steps ckpt resumes time``, a config key, a metric name — its
last value — or ``best:METRIC``; ``-KEY`` sorts descending; runs lacking the key sort last),
``--filter KEY=VALUE`` (repeatable, all must match; KEY as for ``--sort``; numbers compare by
value, ``VALUE`` may hold shell wildcards), ``--format table|md|csv|json``, ``--plot FILE.png``
(the metrics' curves of all runs overlaid, labelled by their differing keys), ``--width N``
(table width; default: the terminal's, else 100).

The table drops the experiment column and prints it above the table when all runs share it,
names runs by their path below the folder the runs share, shortens a config key to its last
part when that is unambiguous (``clip_range`` for ``ppo.clip_range``), and elides the middle of
long run names to fit the width.

JSON output (``--format json``), stable; new keys may be added, none renamed or removed::

    {
      "version": 1,
      "metrics": [{"name": "reward/mean", "mode": "max"}],      # mode: which value is "best"
      "differing_keys": ["ppo.clip_range", "seed"],               # sorted dotted config keys
      "runs": [                                                   # in the --sort order
        {
          "experiment": "default",          # config experiment_name (else the folder above runs/ or sweeps/)
          "run": "sweeps/S/seed=1",         # path below the experiment folder (or below PATH)
          "path": "/abs/path/to/run",
          "status": "completed",            # completed | interrupted | failed | running | killed | null
                                            # (killed: session.json says running, no live process holds the run)
          "step": 20, "max_steps": 20,      # updates done, updates asked for (null if unknown)
          "last_checkpoint_step": 20,       # null when none was saved
          "attempts": 2, "resumes": 1,      # processes that trained it; those that resumed a checkpoint
          "training_time": 5.12,            # seconds of training, summed over attempts
          "config": {"ppo.clip_range": 0.1, "seed": 1},   # the differing keys (null: key absent)
          "metrics": {"reward/mean": {"last": 0.31, "last_step": 20, "best": 0.35, "best_step": 18}}
                                            # all four null when the run logged no value
        }
      ],
      "skipped": [{"path": "/abs/path", "reason": "session.json is not valid JSON (...)"}]
    }

Exit status: 0 when at least one run was found (even if ``--filter`` kept none), 1 when none
was, 2 for a usage error (or ``--plot`` without matplotlib).

The table of runs is a pandas DataFrame (:func:`table_frame`, what ``csv`` prints); Markdown is
tabulate's GitHub format; ``--plot`` draws with matplotlib's object API. What no library does is
kept here: finding runs, reporting damaged ones, and the terminal table, which wraps a wide
comparison into several tables that fit the terminal.

Importing this module is cheap (no torch, no Hydra, no pandas until a table is printed): it reads
JSON and YAML files only.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from so8t.exit_codes import ExitCode
from so8t.run.lock import held_by_live_process
from so8t.run.metrics import read_metrics

__all__ = ["Run", "Skipped", "find_runs", "load_run", "compare", "main", "JSON_VERSION"]

JSON_VERSION = 1
DEFAULT_METRIC = "reward/mean"
# Keys that name a run rather than shape it: never listed as differing config keys.
NAMING_KEYS = ("run_name", "sweep_name", "experiment_name")
# Files whose presence makes a folder look like a run (it then needs a session.json).
RUN_MARKERS = ("session.json", "metrics.jsonl", "checkpoints", "train.log", ".hydra")
MAX_DEPTH = 8  # how far below each PATH to look for runs
COLUMNS = ("experiment", "run", "status", "steps", "max_steps", "ckpt", "resumes", "time")


class Damaged(Exception):
    """A run file that cannot be read; the message says which and why."""


@dataclass
class Skipped:
    path: Path
    reason: str


@dataclass
class MetricSummary:
    last: float | None = None
    last_step: int | None = None
    best: float | None = None
    best_step: int | None = None


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
            return sorted(it, key=lambda e: _natural_key(e.name))
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
        raise Damaged(f"session.json cannot be read ({_short(exc)})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Damaged(f"session.json is not valid JSON ({_short(exc)})") from None
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
        raise Damaged(f"{file.name} cannot be read ({_short(exc)})") from None


def _read_config(file: Path) -> dict[str, Any]:
    """Flat ``{"dotted.key": value}`` of a saved Hydra config, interpolations resolved where they
    can be outside the run (a custom resolver that cannot keeps its text)."""
    if not file.exists():
        return {}
    try:
        from omegaconf import OmegaConf

        node = OmegaConf.load(file)
    except Exception as exc:  # noqa: BLE001 - YAML and OmegaConf raise many types
        raise Damaged(f".hydra/config.yaml cannot be read ({_short(exc)})") from None
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


# ------------------------------------------------------------------------------------------
# metrics, differing keys, filter and sort


@dataclass(frozen=True)
class Metric:
    name: str
    mode: str  # "max" or "min"

    @staticmethod
    def parse(text: str) -> Metric:
        name, _, mode = text.rpartition(":") if text.endswith((":min", ":max")) else (text, "", "")
        if not mode:
            lower = name.lower()
            mode = "min" if lower.startswith(("loss", "time/")) or "kl" in lower else "max"
        return Metric(name, mode)


def summarize(rows: Sequence[dict[str, Any]], metric: Metric) -> MetricSummary:
    summary = MetricSummary()
    for row in rows:
        value = row.get(metric.name)
        if not _is_number(value) or not math.isfinite(value):
            continue
        summary.last, summary.last_step = float(value), row["step"]
        better = summary.best is None or (value > summary.best if metric.mode == "max" else value < summary.best)
        if better:
            summary.best, summary.best_step = float(value), row["step"]
    return summary


_MISSING = object()


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values are not the same in all runs (absent counts as a value)."""
    if len(runs) < 2:
        return []
    keys = sorted({k for r in runs for k in r.config} - set(NAMING_KEYS))
    return [k for k in keys if len({_canonical(r.config.get(k, _MISSING)) for r in runs}) > 1]


def _canonical(value: Any) -> str:
    if value is _MISSING:
        return "\0missing"
    if _is_number(value):
        return repr(float(value))
    return json.dumps(value, sort_keys=True, default=str)


def _field(run: Run, key: str, metrics: dict[str, MetricSummary]) -> Any:
    """Value of a --sort/--filter key for one run (``_MISSING`` when it has none)."""
    if key == "steps":
        return run.step
    if key == "ckpt":
        return run.last_checkpoint_step
    if key == "time":
        return run.training_time
    if key in COLUMNS or key == "path":
        value = getattr(run, key)
        return str(value) if isinstance(value, Path) else value
    if key.startswith("best:") and key[5:] in metrics:
        return metrics[key[5:]].best
    if key in metrics:
        return metrics[key].last
    if key in run.config:
        return run.config[key]
    # A metric not chosen with --metric: summarised on the fly.
    best = key.startswith("best:")
    name = key[5:] if best else key
    if any(name in row for row in run.rows):
        summary = summarize(run.rows, Metric.parse(name))
        return summary.best if best else summary.last
    return _MISSING


def _matches(value: Any, pattern: str) -> bool:
    if value is _MISSING:
        return False
    if isinstance(value, bool) or value is None:
        return str(value).lower() == pattern.lower() or (value is None and pattern in ("null", "~"))
    if _is_number(value):
        try:
            return math.isclose(float(value), float(pattern), rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            return fnmatch.fnmatchcase(str(value), pattern)
    if not isinstance(value, str):
        try:
            if json.loads(pattern) == value:  # a list or mapping written as JSON
                return True
        except ValueError:
            pass
    text = value if isinstance(value, str) else json.dumps(value)
    return text == pattern or fnmatch.fnmatchcase(text, pattern)


def _sort_key(value: Any) -> tuple:
    if value is _MISSING or value is None:
        return (2, 0, "")
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0, _natural_key(value if isinstance(value, str) else json.dumps(value)))


# ------------------------------------------------------------------------------------------
# the comparison


@dataclass
class Comparison:
    runs: list[Run]
    metrics: list[Metric]
    summaries: list[dict[str, MetricSummary]]
    keys: list[str]
    skipped: list[Skipped]
    found: int  # runs read before --filter
    known_keys: set[str] = field(default_factory=set)  # config keys of all runs read

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "metrics": [{"name": m.name, "mode": m.mode} for m in self.metrics],
            "differing_keys": list(self.keys),
            "runs": [
                {
                    "experiment": run.experiment,
                    "run": run.run,
                    "path": str(run.path.resolve()),
                    "status": run.status,
                    "step": run.step,
                    "max_steps": run.max_steps,
                    "last_checkpoint_step": run.last_checkpoint_step,
                    "attempts": run.attempts,
                    "resumes": run.resumes,
                    "training_time": round(run.training_time, 3),
                    "config": {k: _jsonable(run.config.get(k)) for k in self.keys},
                    "metrics": {name: vars(s) for name, s in summary.items()},
                }
                for run, summary in zip(self.runs, self.summaries)
            ],
            "skipped": [{"path": str(s.path.resolve()), "reason": s.reason} for s in self.skipped],
        }


def compare(paths: Sequence[str | os.PathLike[str]], metrics: Sequence[str] = (DEFAULT_METRIC,),
            sort: str | None = None, filters: Sequence[str] = ()) -> Comparison:
    """Find, read, filter and sort the runs below ``paths``. Never raises for a bad folder."""
    found, skipped = find_runs(paths)
    roots = [Path(p) for p in paths]
    metric_specs = _unique_metrics(metrics)
    runs: list[Run] = []
    for path in found:
        root = next((r for r in roots if _is_below(path, r)), None)
        try:
            runs.append(load_run(path, root))
        except Damaged as exc:
            skipped.append(Skipped(path, f"damaged: {exc}"))
        except Exception as exc:  # noqa: BLE001 - never crash on a folder we do not understand
            skipped.append(Skipped(path, f"unreadable ({type(exc).__name__}: {_short(exc)})"))
    total = len(runs)
    loaded = list(runs)
    summaries = [{m.name: summarize(r.rows, m) for m in metric_specs} for r in runs]
    pairs = list(zip(runs, summaries))
    for spec in filters:
        key, _, pattern = spec.partition("=")
        pairs = [(r, s) for r, s in pairs if _matches(_field(r, key.strip(), s), pattern.strip())]
    if sort:
        descending = sort.startswith("-")
        key = sort.lstrip("-+")
        present = [p for p in pairs if _field(p[0], key, p[1]) not in (_MISSING, None)]
        absent = [p for p in pairs if _field(p[0], key, p[1]) in (_MISSING, None)]
        present.sort(key=lambda p: _sort_key(_field(p[0], key, p[1])), reverse=descending)
        pairs = present + absent
    else:
        pairs.sort(key=lambda p: (_natural_key(p[0].experiment), _natural_key(p[0].run)))
    runs = [r for r, _ in pairs]
    known = {k for r in loaded for k in r.config} | {k for r in loaded for row in r.rows for k in row}
    return Comparison(runs, metric_specs, [s for _, s in pairs], differing_keys(runs), skipped, total, known)


def _unique_metrics(metrics: Sequence[str]) -> list[Metric]:
    specs: list[Metric] = []
    for text in metrics or (DEFAULT_METRIC,):
        spec = Metric.parse(text)
        if spec.name not in {s.name for s in specs}:
            specs.append(spec)
    return specs


# ------------------------------------------------------------------------------------------
# output


# Longest config value or key shown in the terminal table (the csv, md and json keep them whole).
MAX_CELL = 24


@dataclass
class _Column:
    header: str
    cells: list[str]
    align: str = "<"  # "<" text, ">" numbers
    span: str | None = None  # a metric name written above this column and the next

    @property
    def width(self) -> int:
        return max(len(self.header), *(len(c) for c in self.cells))


def render_table(cmp: Comparison, width: int = 100) -> str:
    """A plain-text table meant to stay within ``width`` columns.

    Too wide even with the run names shortened, it is printed as several tables: the runs'
    state, then (with the run names again) their config keys and metrics, as many columns to a
    table as fit. Long config values are shortened in the middle (``MAX_CELL`` characters).
    """
    if not cmp.runs:
        return "no runs match\n" if cmp.found else "no runs found\n"
    experiments = sorted({r.experiment for r in cmp.runs})
    show_experiment = len(experiments) > 1
    common = _common_parent([r.path for r in cmp.runs])
    context = [] if show_experiment else [f"experiment: {experiments[0]}"]
    context.append(f"{len(cmp.runs)} run{'s' if len(cmp.runs) != 1 else ''} in {_display_path(common)}")

    base: list[_Column] = []
    if show_experiment:
        base.append(_Column("EXPERIMENT", [r.experiment for r in cmp.runs]))
    # One experiment: runs by their path below the folder they share (a sweep: the job names);
    # several: by their path below their experiment folder.
    run = _Column("RUN", [r.run if show_experiment else _relative(r.path, common) for r in cmp.runs])
    base += [
        run,
        _Column("STATUS", [r.status or "?" for r in cmp.runs]),
        _Column("STEPS", [f"{r.step}/{r.max_steps if r.max_steps is not None else '?'}" for r in cmp.runs], ">"),
        _Column("CKPT", [_text(r.last_checkpoint_step) for r in cmp.runs], ">"),
        _Column("RES", [str(r.resumes) for r in cmp.runs], ">"),
        _Column("TIME", [_duration(r.training_time) for r in cmp.runs], ">"),
    ]
    extra: list[_Column] = []
    for key, short in zip(cmp.keys, _short_keys(cmp.keys)):
        values = [r.config.get(key, _MISSING) for r in cmp.runs]
        numeric = all(_is_number(v) for v in values)
        cells = ["-" if v is _MISSING else _elide(_text(v), MAX_CELL) for v in values]
        extra.append(_Column(_elide(short, MAX_CELL), cells, ">" if numeric else "<"))
    for metric in cmp.metrics:
        extra.append(_Column("last", [_number(s[metric.name].last) for s in cmp.summaries], ">", metric.name))
        digits = max(len(str(s[metric.name].best_step)) for s in cmp.summaries)
        extra.append(_Column("best@step", [_best(s[metric.name], digits) for s in cmp.summaries], ">"))

    lines = [_elide(" · ".join(context), width)]
    whole = _block(base + extra, run, width)
    if max(len(line) for line in whole) <= width or not extra:
        lines += whole
    else:
        lines += _block(base, run, width)
        for group in _column_groups(extra, width - min(run.width, 16) - 2):
            lines += [""] + _block([run] + group, run, width)
    return "\n".join(lines) + "\n"


def _column_groups(columns: list[_Column], width: int) -> list[list[_Column]]:
    """Split columns into tables that each fit ``width`` (a metric's two columns stay together)."""
    units: list[list[_Column]] = []
    i = 0
    while i < len(columns):
        size = 2 if columns[i].span and i + 1 < len(columns) else 1
        units.append(columns[i:i + size])
        i += size
    groups: list[list[_Column]] = [[]]
    used = 0
    for unit in units:
        need = sum(c.width + 2 for c in unit)
        if groups[-1] and used + need > width:
            groups.append([])
            used = 0
        groups[-1].extend(unit)
        used += need
    return groups


def _block(columns: list[_Column], elidable: _Column, width: int) -> list[str]:
    """Lines of one table; the run names are shortened in the middle if it is too wide."""
    widths = [c.width for c in columns]
    for i, column in enumerate(columns):  # a metric name spans its two columns
        if column.span and i + 1 < len(columns):
            widths[i + 1] = max(widths[i + 1], len(column.span) - widths[i] - 2)
    index = columns.index(elidable)
    over = sum(widths) + 2 * (len(widths) - 1) - width
    cells = [list(c.cells) for c in columns]
    if over > 0:
        new = max(len(elidable.header), 16, widths[index] - over)
        if new < widths[index]:
            widths[index] = new
            cells[index] = [_elide(c, new) for c in cells[index]]

    def line(row: list[str]) -> str:
        out = [c.ljust(w) if col.align == "<" else c.rjust(w) for c, w, col in zip(row, widths, columns)]
        return "  ".join(out).rstrip()

    lines = []
    if any(c.span for c in columns):
        top, i = [], 0
        while i < len(columns):
            if columns[i].span and i + 1 < len(columns):
                top.append(columns[i].span.ljust(widths[i] + 2 + widths[i + 1]))
                i += 2
            else:
                top.append(" " * widths[i])
                i += 1
        lines.append("  ".join(top).rstrip())
    lines.append(line([c.header for c in columns]))
    lines += [line([cells[c][r] for c in range(len(columns))]) for r in range(len(elidable.cells))]
    return lines


def _elide(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + text[len(text) - tail:]


def _short_keys(keys: Sequence[str]) -> list[str]:
    """Last part of each dotted key, or the full key where that part is not unique."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [short if last.count(short) == 1 else key for key, short in zip(keys, last)]


def table_frame(cmp: Comparison):
    """The runs as a pandas DataFrame with every column (what csv and md print), one row per run.

    Columns are Python objects, so integers stay integers where some runs lack a value."""
    import pandas as pd

    header, rows = _rows(cmp)
    return pd.DataFrame(rows, columns=header, dtype=object)


def _rows(cmp: Comparison) -> tuple[list[str], list[list[Any]]]:
    header = ["experiment", "run", "status", "step", "max_steps", "last_checkpoint_step", "resumes",
              "training_time", *cmp.keys]
    for m in cmp.metrics:
        header += [m.name, f"{m.name}@best", f"{m.name}@best_step"]
    rows = []
    for run, summary in zip(cmp.runs, cmp.summaries):
        row: list[Any] = [run.experiment, run.run, run.status, run.step, run.max_steps,
                          run.last_checkpoint_step, run.resumes, round(run.training_time, 3)]
        row += [run.config.get(k) for k in cmp.keys]
        for m in cmp.metrics:
            s = summary[m.name]
            row += [s.last, s.best, s.best_step]
        rows.append(row)
    return header, rows


def render_csv(cmp: Comparison) -> str:
    frame = table_frame(cmp).map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    return frame.to_csv(index=False, lineterminator="\n")


def render_markdown(cmp: Comparison) -> str:
    """A GitHub-flavoured Markdown table (tabulate), metric values to 4 significant digits."""
    from tabulate import tabulate

    frame = table_frame(cmp)
    metric_columns = set(frame.columns[len(frame.columns) - 3 * len(cmp.metrics):])

    def cell(column: str, value: Any) -> str:
        if value is None:
            return ""
        text = _number(value) if column in metric_columns and isinstance(value, float) else _text(value)
        return text.replace("|", "\\|")

    cells = [[cell(c, v) for c, v in zip(frame.columns, row)] for row in frame.itertuples(index=False)]
    return tabulate(cells, headers=list(frame.columns), tablefmt="github", disable_numparse=True) + "\n"


def plot(cmp: Comparison, file: str | os.PathLike[str]) -> Path:
    """Draw each metric's curve of every run, one panel per metric, into a PNG file.

    matplotlib's object API (a ``Figure`` of its own, no pyplot): no global backend switch, no
    figure left open in a process that imports this."""
    from matplotlib.figure import Figure

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    labels = plot_labels(cmp)
    count = max(1, len(cmp.metrics))
    fig = Figure(figsize=(9.0, 3.2 * count + 0.6))
    axes = fig.subplots(count, 1, squeeze=False, sharex=True)
    styles = ["-", "--", "-.", ":"]
    for ax, metric in zip(axes[:, 0], cmp.metrics):
        drawn = 0
        for index, (run, label) in enumerate(zip(cmp.runs, labels)):
            points = [(r["step"], r[metric.name]) for r in run.rows
                      if _is_number(r.get(metric.name)) and math.isfinite(r[metric.name])]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, linewidth=1.4, color=f"C{index % 10}",
                    linestyle=styles[(index // 10) % len(styles)])
            drawn += 1
        ax.set_ylabel(metric.name)
        ax.set_title(metric.name, fontsize="medium", loc="left")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            ax.text(0.5, 0.5, "no values logged", transform=ax.transAxes, ha="center", va="center")
    axes[-1, 0].set_xlabel("PPO update (step)")
    fig.savefig(file, dpi=110, bbox_inches="tight")
    return file


def plot_labels(cmp: Comparison) -> list[str]:
    """Readable curve labels: the run's differing keys (short names), else its run path."""
    shorts = _short_keys(cmp.keys)
    several = len({r.experiment for r in cmp.runs}) > 1
    labels = []
    for run in cmp.runs:
        parts = [f"{s}={_text(run.config[k])}" for k, s in zip(cmp.keys, shorts) if k in run.config]
        label = ", ".join(parts) if parts else run.run
        labels.append(f"{run.experiment}: {label}" if several else label)
    return labels


# ------------------------------------------------------------------------------------------
# small helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if (value != 0 and abs(value) < 1e-3) or abs(value) >= 1e5:
        return f"{value:.2e}"
    return f"{value:.3f}"


def _best(summary: MetricSummary, digits: int = 0) -> str:
    """``0.425@7 `` — the step padded to ``digits`` so that the values line up."""
    if summary.best is None:
        return "-".ljust(digits + 1) if digits else "-"
    return f"{_number(summary.best)}@{str(summary.best_step).ljust(digits)}"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _duration(seconds: float) -> str:
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


def _natural_key(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _is_below(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _common_parent(paths: Sequence[Path]) -> Path:
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return resolved[0].parent
    return Path(os.path.commonpath([str(p) for p in resolved]))


def _relative(path: Path, parent: Path) -> str:
    try:
        return path.resolve().relative_to(parent).as_posix()
    except ValueError:
        return str(path)


def _display_path(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="so8t-compare",
        description="Compare SO8T runs (single runs and sweep jobs) found below the given folders.",
        epilog="Details, and the JSON layout: python -m pydoc so8t.compare",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folders to search for runs")
    parser.add_argument("--metric", action="append", metavar="NAME[:min|:max]",
                        help=f"metric to summarise (repeatable; default {DEFAULT_METRIC})")
    parser.add_argument("--sort", metavar="[-]KEY",
                        help="sort by a column, config key, metric (last value) or best:METRIC; "
                             "a leading - sorts descending")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose KEY matches VALUE (repeatable; wildcards allowed)")
    parser.add_argument("--format", choices=("table", "md", "csv", "json"), default="table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the metrics' curves of all runs")
    parser.add_argument("--width", type=int, default=None,
                        help="table width in columns (default: the terminal's, else 100)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for spec in args.filter:
        if "=" not in spec or not spec.partition("=")[0].strip():
            print(f"so8t-compare: --filter {spec!r} must look like KEY=VALUE", file=sys.stderr)
            return ExitCode.REFUSED
    cmp = compare(args.paths, args.metric or [DEFAULT_METRIC], args.sort, args.filter)
    for skipped in cmp.skipped:
        print(f"so8t-compare: skipped {_display_path(skipped.path.resolve())}: {skipped.reason}",
              file=sys.stderr)
    unknown = _unknown_keys(cmp, [s.partition("=")[0].strip() for s in args.filter]
                            + ([args.sort.lstrip("-+")] if args.sort else []))
    for key in unknown:
        print(f"so8t-compare: no run has a column, config key or metric named {key!r}", file=sys.stderr)

    if args.format == "json":
        text = json.dumps(cmp.to_json(), indent=2, allow_nan=False, default=str) + "\n"
    elif args.format == "csv":
        text = render_csv(cmp)
    elif args.format == "md":
        text = render_markdown(cmp)
    else:
        width = args.width or shutil.get_terminal_size((100, 24)).columns
        text = render_table(cmp, width)
    sys.stdout.write(text)

    if args.plot:
        try:
            path = plot(cmp, args.plot)
        except ImportError:
            print("so8t-compare: --plot needs matplotlib (pip install \"so8t[plot]\")", file=sys.stderr)
            return ExitCode.REFUSED
        except OSError as exc:
            print(f"so8t-compare: cannot write {args.plot}: {_short(exc)}", file=sys.stderr)
            return ExitCode.REFUSED
        print(f"so8t-compare: plot written to {path}", file=sys.stderr)
    # 1 (FAILED): nothing to compare was found below the given folders.
    return ExitCode.OK if cmp.found else ExitCode.FAILED


def _unknown_keys(cmp: Comparison, keys: Sequence[str]) -> list[str]:
    """Keys of --filter/--sort that no run found has (typos would otherwise filter silently)."""
    if not cmp.found:
        return []
    known = set(COLUMNS) | {"path"} | cmp.known_keys
    known |= {f"best:{k}" for k in cmp.known_keys}
    return [k for k in dict.fromkeys(keys) if k not in known]


if __name__ == "__main__":
    sys.exit(main())
