"""What a job of a Hydra multirun sweep hands back: an objective, or a failure that spares the rest.

``so8t-train -m sweep_name=S ppo.optimizer.lr=1e-4,1e-3 seed=1,2`` runs one job per
combination in ``outputs/<experiment_name>/sweeps/<S>/<run_name>/``; ``<run_name>`` is made from
that job's overrides by the rule of a single run's default name (so8t.config.identity), so a job
keeps its folder whatever its position in the sweep. Re-running the same command therefore finds
every job's folder again: a completed job is skipped in seconds (so8t.recipe reads its
``session.json`` before building anything), an interrupted or killed job resumes from its newest
checkpoint, and a failed one runs again.

Exit codes of a job (so8t.recipe) become, in a sweep:

* 0: the objective, the mean of ``optimized_metric`` (``reward/mean`` by default) over the last
  10 % of the run's updates (see :func:`final_reward`), returned by the task function for Hydra
  sweepers (Optuna, Nevergrad …) to optimise;
* 1 failed, 2 refused, 3 locked: a :class:`JobFailed` exception. Hydra's launchers catch an
  ``Exception`` from a job, record the job as failed and run the other jobs; when all have
  run, Hydra reports the first failure and exits with status 1. (A ``SystemExit`` would
  escape the launcher and end the whole sweep, which a single run's exit code would do.)
* 75 deadline, 128+N signal N: ``SystemExit`` with that code — a stop request ends the sweep,
  after the job saved its checkpoint (or tried to: a stop whose save failed is still a stop);
  re-running the command continues it.
* 74 checkpointing failed: ``SystemExit`` too — a full disk would fail the next jobs the same
  way, so the sweep stops rather than run them unprotected.

Outside a sweep, a non-zero code is the process's exit code, as before.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from so8t.exit_codes import ExitCode

__all__ = ["JobFailed", "final_reward", "in_multirun", "job_result", "OBJECTIVE_METRIC"]

log = logging.getLogger(__name__)

# The metric the objective averages unless ``optimized_metric`` names another, and the share of
# the last updates it averages over.
OBJECTIVE_METRIC = "reward/mean"
OBJECTIVE_TAIL = 0.1

# Exit codes after which the other jobs of a sweep still run (see the module docstring).
_JOB_FAILURES = {ExitCode.FAILED: "failed", ExitCode.REFUSED: "refused", ExitCode.LOCKED: "locked by another process"}


class JobFailed(RuntimeError):
    """A sweep job ended with a failure exit code; the launcher records it and goes on."""

    def __init__(self, code: int, run_dir: Path):
        self.code = code
        self.run_dir = run_dir
        what = _JOB_FAILURES.get(code, "failed")
        super().__init__(f"job in {run_dir} {what} (exit code {code}); see its train.log. "
                         f"The other jobs of the sweep ran; re-run the same command to retry.")

    def __reduce__(self):
        # Launchers send a job's result, this exception included, back from their worker
        # processes (joblib) or cluster nodes (submitit) by pickling it.
        return (type(self), (self.code, self.run_dir))


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def final_reward(run_dir: str | os.PathLike[str], metrics_file: str = "metrics.jsonl",
                 metric: str = OBJECTIVE_METRIC, tail: float = OBJECTIVE_TAIL) -> float:
    """Mean of ``metric`` over the last ``tail`` share of the run's updates (at least one).

    Steps redone after a resume count once (the last row per step wins). NaN when the run
    logged no value of the metric.
    """
    from so8t.run.metrics import current_metric_name, read_metrics

    metric = current_metric_name(metric)  # an old name in a sweep's optimized_metric still reads
    values = [r[metric] for r in read_metrics(Path(run_dir) / metrics_file)
              if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
    if not values:
        return math.nan
    count = max(1, round(len(values) * tail))
    return sum(values[-count:]) / count


def job_result(code: int, run_dir: Path, metrics_file: str = "metrics.jsonl",
               metric: str = OBJECTIVE_METRIC) -> float:
    """Turn a run's exit code into the task function's return value (see the module docstring)."""
    if code == ExitCode.OK:
        value = final_reward(run_dir, metrics_file, metric)
        if math.isnan(value):
            log.warning("optimized_metric=%s: the run logged no value of it; the objective is NaN", metric)
        else:
            # A single run's end summary already says how the reward went.
            log.log(logging.INFO if in_multirun() else logging.DEBUG,
                    "objective: mean %s over the last %d %% of updates = %.4f",
                    metric, round(100 * OBJECTIVE_TAIL), value)
        return value
    if code in _JOB_FAILURES and in_multirun():
        raise JobFailed(code, run_dir)
    raise SystemExit(code)
