"""``so8t-train``: compose the config, validate it, build the run and train.

Nothing else lives here: the run's orchestration is in so8t.recipe, the PPO in so8t.ppo.
Heavy libraries (torch, transformers, peft) are imported only after the config is valid,
so a wrong override fails in seconds.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from so8t.config import CONF_PACKAGE, register
from so8t.config.validate import ConfigValidationError, validate

log = logging.getLogger("so8t.train")

register()


@hydra.main(config_path=f"pkg://{CONF_PACKAGE}", config_name="train", version_base="1.3")
def _run(cfg: DictConfig) -> float:
    """One run (or one job of a ``-m`` sweep); returns the objective, the final mean reward."""
    from so8t.recipe import EXIT_REFUSED, run_dir_of_job
    from so8t.sweep import job_result

    try:
        validate(cfg)
    except ConfigValidationError as exc:
        log.error("%s", exc)
        return job_result(EXIT_REFUSED, run_dir_of_job())
    from so8t.recipe import run_training

    return job_result(run_training(cfg), run_dir_of_job(), cfg.output.metrics_file, cfg.optimized_metric)


def main() -> None:
    _run()


if __name__ == "__main__":
    # Run the entry point of the importable module, not of this __main__ copy, so that launchers
    # which pickle the task function (joblib, submitit) find it by name in their workers.
    from so8t.train import main as _main

    sys.exit(_main())
