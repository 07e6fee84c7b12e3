"""Schema of the ``logger`` group: the experiment trackers a run reports its metrics to.

``metrics.jsonl`` (the ``jsonl`` backend) is always written: resume, ``so8t-compare`` and the
sweep objective read it. The other backends are optional extras, imported only when listed in
``logger.backends`` (see so8t.run.trackers). Values live in conf/logger/default.yaml (see the
rule in so8t.config.schema).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from so8t.config.choice import Choice


class TrackerBackend(Choice):
    jsonl = "jsonl"
    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


TRACKER_BACKENDS = tuple(backend.value for backend in TrackerBackend)
# The package each backend imports, and the extra that installs it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class TensorBoardConfig:
    # Event files' folder, relative to the run dir.
    log_dir: str = MISSING


@dataclass
class WandbConfig:
    project: str = MISSING
    entity: Optional[str] = MISSING
    # null: the sweep folder's name for sweep jobs, none for single runs.
    group: Optional[str] = MISSING
    tags: List[str] = MISSING
    # null: W&B's own choice (WANDB_MODE, else online).
    mode: Optional[WandbMode] = MISSING


@dataclass
class MlflowConfig:
    # null: MLflow's own choice (MLFLOW_TRACKING_URI, else ./mlflow.db).
    tracking_uri: Optional[str] = MISSING
    # null: the run's experiment_name.
    experiment_name: Optional[str] = MISSING


@dataclass
class LoggerConfig:
    backends: List[TrackerBackend] = MISSING
    tensorboard: TensorBoardConfig = MISSING
    wandb: WandbConfig = MISSING
    mlflow: MlflowConfig = MISSING
