"""A run's metrics summarised: the last value and the best one, each with its step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from so8t.compare.text import is_number
from so8t.run.metrics import current_metric_name

DEFAULT_METRIC = "reward/mean"


@dataclass
class MetricSummary:
    last: float | None = None
    last_step: int | None = None
    best: float | None = None
    best_step: int | None = None


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
        if not is_number(value) or not math.isfinite(value):
            continue
        summary.last, summary.last_step = float(value), row["step"]
        better = summary.best is None or (value > summary.best if metric.mode == "max" else value < summary.best)
        if better:
            summary.best, summary.best_step = float(value), row["step"]
    return summary


def unique_metrics(metrics: Sequence[str]) -> list[Metric]:
    specs: list[Metric] = []
    for text in metrics or (DEFAULT_METRIC,):
        spec = Metric.parse(text)
        # An old name (--metric entropy) names today's metric: the rows are read under those.
        spec = Metric(current_metric_name(spec.name), spec.mode)
        if spec.name not in {s.name for s in specs}:
            specs.append(spec)
    return specs
