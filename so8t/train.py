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

from so8t.config import CONF_DIR, register
from so8t.config.validate import ConfigValidationError, validate

log = logging.getLogger("so8t.train")

register()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigValidationError as exc:
        log.error("%s", exc)
        raise SystemExit(2)
    from so8t.recipe import run_training

    code = run_training(cfg)
    if code:
        raise SystemExit(code)


def main() -> None:
    _run()


if __name__ == "__main__":
    sys.exit(main())
