"""The comparison: the runs found, filtered and sorted, their differing config keys and metric summaries."""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from so8t.compare.metrics import DEFAULT_METRIC, Metric, MetricSummary, summarize, unique_metrics
from so8t.compare.runs import Damaged, Run, Skipped, find_runs, load_run
from so8t.compare.text import MISSING, is_below, is_number, jsonable, natural_key, short_error
from so8t.run.metrics import current_metric_name

JSON_VERSION = 1

# Keys that name a run rather than shape it: never listed as differing config keys.
NAMING_KEYS = ("run_name", "sweep_name", "experiment_name")

# The columns of the table, also keys of --sort and --filter.
COLUMNS = ("experiment", "run", "status", "steps", "max_steps", "ckpt", "resumes", "time")


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values are not the same in all runs (absent counts as a value)."""
    if len(runs) < 2:
        return []
    keys = sorted({k for r in runs for k in r.config} - set(NAMING_KEYS))
    return [k for k in keys if len({_canonical(r.config.get(k, MISSING)) for r in runs}) > 1]


def _canonical(value: Any) -> str:
    if value is MISSING:
        return "\0missing"
    if is_number(value):
        return repr(float(value))
    return json.dumps(value, sort_keys=True, default=str)


def field_value(run: Run, key: str, metrics: dict[str, MetricSummary]) -> Any:
    """Value of a --sort/--filter key for one run (``MISSING`` when it has none)."""
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
    return MISSING


def current_key(key: str) -> str:
    """A --sort/--filter key with a metric's old name (``entropy``, ``best:lr`` …) under today's
    name, as the rows read by read_metrics carry it; any other key as it is."""
    best = key.startswith("best:")
    name = current_metric_name(key[5:] if best else key)
    return f"best:{name}" if best else name


def _matches(value: Any, pattern: str) -> bool:
    if value is MISSING:
        return False
    if isinstance(value, bool) or value is None:
        return str(value).lower() == pattern.lower() or (value is None and pattern in ("null", "~"))
    if is_number(value):
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
    if value is MISSING or value is None:
        return (2, 0, "")
    if is_number(value):
        return (0, float(value), "")
    return (1, 0, natural_key(value if isinstance(value, str) else json.dumps(value)))


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
                    "config": {k: jsonable(run.config.get(k)) for k in self.keys},
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
    metric_specs = unique_metrics(metrics)
    runs: list[Run] = []
    for path in found:
        root = next((r for r in roots if is_below(path, r)), None)
        try:
            runs.append(load_run(path, root))
        except Damaged as exc:
            skipped.append(Skipped(path, f"damaged: {exc}"))
        except Exception as exc:  # noqa: BLE001 - never crash on a folder we do not understand
            skipped.append(Skipped(path, f"unreadable ({type(exc).__name__}: {short_error(exc)})"))
    total = len(runs)
    loaded = list(runs)
    summaries = [{m.name: summarize(r.rows, m) for m in metric_specs} for r in runs]
    pairs = list(zip(runs, summaries))
    for spec in filters:
        key, _, pattern = spec.partition("=")
        key = current_key(key.strip())
        pairs = [(r, s) for r, s in pairs if _matches(field_value(r, key, s), pattern.strip())]
    if sort:
        descending = sort.startswith("-")
        key = current_key(sort.lstrip("-+"))
        present = [p for p in pairs if field_value(p[0], key, p[1]) not in (MISSING, None)]
        absent = [p for p in pairs if field_value(p[0], key, p[1]) in (MISSING, None)]
        present.sort(key=lambda p: _sort_key(field_value(p[0], key, p[1])), reverse=descending)
        pairs = present + absent
    else:
        pairs.sort(key=lambda p: (natural_key(p[0].experiment), natural_key(p[0].run)))
    runs = [r for r, _ in pairs]
    known = {k for r in loaded for k in r.config} | {k for r in loaded for row in r.rows for k in row}
    return Comparison(runs, metric_specs, [s for _, s in pairs], differing_keys(runs), skipped, total, known)
