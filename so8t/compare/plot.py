"""``--plot``: the metrics' curves of every run, one panel per metric, in a PNG file."""

from __future__ import annotations

import math
import os
from pathlib import Path

from so8t.compare.comparison import Comparison
from so8t.compare.text import format_value, is_number, short_keys


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
                      if is_number(r.get(metric.name)) and math.isfinite(r[metric.name])]
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
    shorts = short_keys(cmp.keys)
    several = len({r.experiment for r in cmp.runs}) > 1
    labels = []
    for run in cmp.runs:
        parts = [f"{s}={format_value(run.config[k])}" for k, s in zip(cmp.keys, shorts) if k in run.config]
        label = ", ".join(parts) if parts else run.run
        labels.append(f"{run.experiment}: {label}" if several else label)
    return labels
