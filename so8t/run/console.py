"""What a person watching a run sees: progress bars, the events to act on, an end summary.

Per-update metric lines are logged to their own logger (``so8t.run.console.updates``); the
console handler of ``conf/hydra/default.yaml`` drops them with :class:`HideUpdates`, so they go to
``train.log`` (and the trackers) only, while the console shows the tqdm bars and the events
(resume, checkpoints, warnings, the summary). Bars switch themselves off when the output is not a
terminal (``output.progress_bars: null``, tqdm's own test), as in SLURM logs and CI.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["HideUpdates", "library_bars", "log_update", "progress_bars", "run_summary"]

log = logging.getLogger(__name__)
_updates = logging.getLogger(f"{__name__}.updates")


class HideUpdates(logging.Filter):
    """A handler filter that keeps the per-update lines off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != _updates.name


def log_update(row: Mapping[str, Any]) -> None:
    """One line per PPO update, for train.log."""
    _updates.info(
        "step %d: reward %.3f loss %.4f kl %.4f entropy %.3f clip %.3f (%.2fs)",
        row["step"], row["reward/mean"], row["loss/total"], row["kl/mean"], row["policy/entropy"],
        row["ppo/clip_fraction"], row["time/step"],
    )


def bar_postfix(row: Mapping[str, Any]) -> dict[str, str]:
    return {
        "reward": f"{row['reward/mean']:.3f}",
        "loss": f"{row['loss/total']:.3f}",
        "kl": f"{row['kl/mean']:.4f}",
        "s/step": f"{row['time/step']:.2f}",
    }


@contextlib.contextmanager
def progress_bars(show: bool | None, max_steps: int, first_step: int, ppo_epochs: int) -> Iterator[tuple]:
    """The updates bar and the PPO epochs bar; ``show`` None: only on a terminal. Log lines
    written meanwhile go through tqdm so that they do not tear the bars."""
    disable = None if show is None else not show
    with logging_redirect_tqdm():
        steps = tqdm(total=max_steps, initial=first_step, desc="updates", unit="update",
                     disable=disable, dynamic_ncols=True)
        epochs = tqdm(total=ppo_epochs, desc="ppo epochs", unit="epoch", leave=False,
                      disable=disable, dynamic_ncols=True)
        try:
            yield steps, epochs
        finally:
            epochs.close()
            steps.close()


def library_bars(show: bool | None) -> None:
    """Switch off the bars of transformers and huggingface_hub (loading weights ...) where so8t's
    own are off, so a log file holds no bar fragments."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _first_and_last(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    values = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    if not values:
        return "not logged"
    (s0, v0), (s1, v1) = values[0], values[-1]
    return f"{v0:.3f} (update {s0}) → {v1:.3f} (update {s1})"


def run_summary(run_dir: Path, status: str, step: int, max_steps: int, first_step: int,
                training_time: float, metrics_file: str) -> str:
    """A few lines saying what the run did, for the end of an attempt."""
    from so8t.checkpoint.store import CheckpointStore, parse_step
    from so8t.run.metrics import read_metrics

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / metrics_file)
    kept = sorted(s for s in (parse_step(p.name) for p in CheckpointStore(run_dir / "checkpoints").list_checkpoints())
                  if s is not None)
    final = run_dir / "final"
    head = {"completed": "run completed", "interrupted": "run stopped"}.get(status, f"run {status}")
    lines = [
        f"{head}: {run_dir.resolve()}",
        f"  updates      {step} of {max_steps} ({step - first_step} in this attempt)",
        f"  training     {training_time:.1f} s",
        f"  reward/mean  {_first_and_last(rows, 'reward/mean')}",
        f"  checkpoints  {', '.join(f'step {s}' for s in kept) if kept else 'none'} (checkpoints/)",
    ]
    if status == "completed" and final.is_dir():
        lines.append(f"  final policy {final.resolve()} (so8t.load_policy, so8t-export)")
    else:
        lines.append("  re-run the same command to continue from the newest checkpoint")
    return "\n".join(lines)
