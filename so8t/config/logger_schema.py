"""Schema of the ``logger`` group: the experiment trackers a run reports its metrics to.

``metrics.jsonl`` (the ``jsonl`` backend) is always written: resume, ``so8t-compare`` and the
sweep objective read it. The other backends are optional extras, imported only when listed in
``logger.backends`` (see so8t.run.trackers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

TRACKER_BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
# The package each backend imports, and the extra that installs it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class TensorBoardConfig:
    # Event files' folder, relative to the run dir.
    log_dir: str = "tensorboard"


@dataclass
class WandbConfig:
    project: str = "so8t"
    entity: Optional[str] = None
    # null: the sweep folder's name for sweep jobs, none for single runs.
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # online | offline | disabled; null: W&B's own choice (WANDB_MODE, else online).
    mode: Optional[str] = None


@dataclass
class MlflowConfig:
    # null: MLflow's own choice (MLFLOW_TRACKING_URI, else ./mlflow.db).
    tracking_uri: Optional[str] = None
    # null: the run's experiment_name.
    experiment_name: Optional[str] = None


@dataclass
class LoggerConfig:
    backends: List[str] = field(default_factory=lambda: ["jsonl"])
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
