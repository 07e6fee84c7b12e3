"""Experiment trackers: each update's metrics row to metrics.jsonl and to the chosen trackers.

``logger.backends`` lists them (``jsonl`` is always on: resume, so8t-compare and the sweep
objective read ``metrics.jsonl``). TensorBoard, W&B and MLflow are optional extras, imported
here only when chosen; so8t.config.validate refuses a chosen one that is not installed.

A resumed run continues the same tracker run, and no tracker holds a step twice or out of order.
After a resume the trainer redoes the updates since the checkpoint, so:

* TensorBoard rewinds: the writer starts with ``purge_step`` = the first step this attempt
  logs, and every reader (TensorBoard, its ``EventAccumulator``) drops the older events from
  that step on. The event file is flushed after each update, so a ``kill -9`` loses none.
* W&B and MLflow cannot drop logged points, so they are sent only the steps beyond the last one
  they already hold — MLflow's store is asked, W&B's local run files are read
  (so8t.run.wandb_log) — and the steps up to the checkpoint that they lack (W&B writes its file
  from a buffer, so a ``kill -9`` loses its last seconds) are sent again from metrics.jsonl,
  which is written first and durably. A redone step is bit-identical on CPU, so the values agree.

The W&B run id and the MLflow run id are kept in ``session.json`` (key ``trackers``), so every
attempt of a run reports to the same tracker run (W&B with ``resume="allow"``).

A tracker that fails while training (a full disk, a lost server) is reported once and dropped
for the rest of the attempt: training and metrics.jsonl go on.
"""

from __future__ import annotations

import logging
import math
import numbers
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from so8t.errors import SetupError
from so8t.run.metrics import MetricsWriter, read_metrics

__all__ = ["Trackers", "open_trackers"]

log = logging.getLogger(__name__)


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, ``step`` excluded: what charts can plot."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg, run_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / cfg.logger.tensorboard.log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step)
        log.info("TensorBoard: tensorboard --logdir %s", log_dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        # SummaryWriter flushes every 2 minutes by default; a kill would lose those updates.
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, cfg, run_dir: Path, session):
        import wandb

        from so8t.config.typed import config_record
        from so8t.run.wandb_log import last_step

        ids = session.data.setdefault("trackers", {}).setdefault("wandb", {})
        if not ids.get("id"):
            ids["id"] = secrets.token_hex(4)  # W&B's own id shape: 8 characters [0-9a-z]
            session.flush()
        settings = cfg.logger.wandb
        group = settings.group
        if group is None:
            from so8t.sweep import in_multirun

            group = Path(run_dir).parent.name if in_multirun() else None
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=group, tags=list(settings.tags),
            name=str(cfg.run_name), id=ids["id"], resume="allow", dir=str(run_dir), mode=settings.mode,
            config=config_record(cfg),
            # so8t's own console and train.log stay as they are.
            settings=wandb.Settings(console="off", quiet=True),
        )
        # What the server holds (online) or the local files of earlier attempts (any mode).
        self.last_logged = max(last_step(run_dir / "wandb", ids["id"]), self.run.starting_step - 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.last_logged:
            self.run.log(scalars, step=step)
            self.last_logged = step

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class _Mlflow:
    name = "mlflow"

    def __init__(self, cfg, run_dir: Path, session):
        from mlflow.tracking import MlflowClient

        settings = cfg.logger.mlflow
        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        ids = session.data.setdefault("trackers", {}).setdefault("mlflow", {})
        run_id = ids.get("run_id") if ids.get("tracking_uri") == self.client.tracking_uri else None
        if run_id is not None and not self._exists(run_id):
            log.warning("MLflow run %s (session.json) is not in %s; starting a new MLflow run",
                        run_id, self.client.tracking_uri)
            run_id = None
        if run_id is None:
            run_id = self._create(cfg, settings.experiment_name or str(cfg.experiment_name), run_dir)
            ids.update(run_id=run_id, tracking_uri=self.client.tracking_uri)
            session.flush()
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        history = self.client.get_metric_history(run_id, "reward/mean")
        self.last_logged = max((m.step for m in history), default=0)
        log.info("MLflow: run %s in %s", run_id, self.client.tracking_uri)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _create(self, cfg, experiment_name: str, run_dir: Path) -> str:
        from mlflow.exceptions import MlflowException

        from so8t.config.identity import flatten
        from so8t.config.typed import config_record

        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(experiment_name)
            except MlflowException:  # a parallel sweep job created it first
                experiment_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        run = self.client.create_run(experiment_id, run_name=str(cfg.run_name),
                                     tags={"so8t.run_dir": str(Path(run_dir).resolve())})
        # Parameters are written once, when the MLflow run is created: MLflow refuses to change
        # one later, and a resume may change result-neutral keys such as max_steps.
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in flatten(config_record(cfg)).items()
                  if not k.startswith("hydra.")]
        for start in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        return run.info.run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step <= self.last_logged:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])
        self.last_logged = step

    def close(self, status: str) -> None:
        mlflow_status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


def _catch_up(backend, rows: list[dict], start_step: int) -> None:
    """Send ``backend`` the rows up to the checkpoint it lacks (see the module docstring)."""
    for row in rows:
        if backend.last_logged < row["step"] <= start_step:
            backend.log(row["step"], _scalars(row))


class Trackers:
    """Writes each metrics row to metrics.jsonl, then to every open tracker."""

    def __init__(self, metrics: MetricsWriter, backends: list):
        self.metrics = metrics
        self.backends = backends

    def log(self, row: Mapping[str, Any]) -> None:
        self.metrics.write(row)  # first and durably: the record resume and so8t-compare rely on
        scalars = _scalars(row)
        for backend in list(self.backends):
            try:
                backend.log(int(row["step"]), scalars)
            except Exception:  # noqa: BLE001 - a tracker must not end a training run
                log.warning("%s failed; it gets no more metrics in this attempt", backend.name, exc_info=True)
                self.backends.remove(backend)

    def close(self, status: str) -> None:
        """Close every tracker (``status``: completed, interrupted or failed), then metrics.jsonl."""
        for backend in self.backends:
            try:
                backend.close(status)
            except Exception:  # noqa: BLE001 - closing a tracker must not hide the run's own outcome
                log.warning("closing %s failed", backend.name, exc_info=True)
        self.backends = []
        self.metrics.close()


def open_trackers(cfg, run_dir: Path, session, start_step: int) -> Trackers:
    """Open metrics.jsonl and the trackers of ``cfg.logger.backends`` for an attempt whose first
    update is ``start_step + 1``; ``session`` is the run's open SessionFile."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / cfg.output.metrics_file
    logged = read_metrics(metrics_path)
    trackers = Trackers(MetricsWriter(metrics_path), [])
    chosen = list(dict.fromkeys(cfg.logger.backends))
    for name in chosen:
        try:
            if name == "tensorboard":
                trackers.backends.append(_TensorBoard(cfg, run_dir, start_step + 1))
            elif name == "wandb":
                trackers.backends.append(_Wandb(cfg, run_dir, session))
            elif name == "mlflow":
                trackers.backends.append(_Mlflow(cfg, run_dir, session))
            if name in ("wandb", "mlflow"):
                _catch_up(trackers.backends[-1], logged, start_step)
        except Exception as exc:
            trackers.close("failed")
            raise SetupError(f"logger.backends: {name} could not start: {exc}") from exc
    return trackers
