"""The table of runs as a pandas DataFrame: every column, one row per run (what csv and md print)."""

from __future__ import annotations

from typing import Any

from so8t.compare.comparison import Comparison


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
