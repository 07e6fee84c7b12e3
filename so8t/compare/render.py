"""The comparison as text: the terminal table, Markdown, CSV and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from so8t.compare.comparison import Comparison
from so8t.compare.metrics import MetricSummary
from so8t.compare.table import table_frame
from so8t.compare.text import (
    MISSING,
    common_parent,
    display_path,
    elide,
    format_duration,
    format_number,
    format_value,
    is_number,
    relative_path,
    short_keys,
)

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
    common = common_parent([r.path for r in cmp.runs])
    context = [] if show_experiment else [f"experiment: {experiments[0]}"]
    context.append(f"{len(cmp.runs)} run{'s' if len(cmp.runs) != 1 else ''} in {display_path(common)}")

    base: list[_Column] = []
    if show_experiment:
        base.append(_Column("EXPERIMENT", [r.experiment for r in cmp.runs]))
    # One experiment: runs by their path below the folder they share (a sweep: the job names);
    # several: by their path below their experiment folder.
    run = _Column("RUN", [r.run if show_experiment else relative_path(r.path, common) for r in cmp.runs])
    base += [
        run,
        _Column("STATUS", [r.status or "?" for r in cmp.runs]),
        _Column("STEPS", [f"{r.step}/{r.max_steps if r.max_steps is not None else '?'}" for r in cmp.runs], ">"),
        _Column("CKPT", [format_value(r.last_checkpoint_step) for r in cmp.runs], ">"),
        _Column("RES", [str(r.resumes) for r in cmp.runs], ">"),
        _Column("TIME", [format_duration(r.training_time) for r in cmp.runs], ">"),
    ]
    extra: list[_Column] = []
    for key, short in zip(cmp.keys, short_keys(cmp.keys)):
        values = [r.config.get(key, MISSING) for r in cmp.runs]
        numeric = all(is_number(v) for v in values)
        cells = ["-" if v is MISSING else elide(format_value(v), MAX_CELL) for v in values]
        extra.append(_Column(elide(short, MAX_CELL), cells, ">" if numeric else "<"))
    for metric in cmp.metrics:
        extra.append(_Column("last", [format_number(s[metric.name].last) for s in cmp.summaries], ">", metric.name))
        digits = max(len(str(s[metric.name].best_step)) for s in cmp.summaries)
        extra.append(_Column("best@step", [_best(s[metric.name], digits) for s in cmp.summaries], ">"))

    lines = [elide(" · ".join(context), width)]
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
    """Lines of one table; the run names are shortened in the middle if it is too wide.

    tabulate lays out the rows (its plain format: columns two spaces apart). What it cannot do
    is kept here: a metric's name written across its two columns, and the widths that make
    room for it and keep the table within ``width``."""
    from tabulate import tabulate

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
            cells[index] = [elide(c, new) for c in cells[index]]

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
    # The header row goes in as a padded data row: tabulate would pad real headers by two more
    # characters, and the padding is what gives a column the width computed above.
    header = [c.header.ljust(w) if c.align == "<" else c.header.rjust(w) for c, w in zip(columns, widths)]
    rows = [[cells[c][r] for c in range(len(columns))] for r in range(len(elidable.cells))]
    # preserve_whitespace: the best@step cells are padded so that their "@" line up.
    text = tabulate([header, *rows], tablefmt="plain", disable_numparse=True, preserve_whitespace=True,
                    colalign=["left" if c.align == "<" else "right" for c in columns])
    return lines + [line.rstrip() for line in text.splitlines()]


def _best(summary: MetricSummary, digits: int = 0) -> str:
    """``0.425@7 `` — the step padded to ``digits`` so that the values line up."""
    if summary.best is None:
        return "-".ljust(digits + 1) if digits else "-"
    return f"{format_number(summary.best)}@{str(summary.best_step).ljust(digits)}"


def render_json(cmp: Comparison) -> str:
    """The stable JSON document described in :mod:`so8t.compare`."""
    return json.dumps(cmp.to_json(), indent=2, allow_nan=False, default=str) + "\n"


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
        text = format_number(value) if column in metric_columns and isinstance(value, float) else format_value(value)
        return text.replace("|", "\\|")

    cells = [[cell(c, v) for c, v in zip(frame.columns, row)] for row in frame.itertuples(index=False)]
    return tabulate(cells, headers=list(frame.columns), tablefmt="github", disable_numparse=True) + "\n"
