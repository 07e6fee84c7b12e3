"""``so8t-train``: compose the config, validate it, build the run and train.

Nothing else lives here: the run's orchestration is in so8t.recipe, the PPO in so8t.ppo.
The config's own checks (so8t.config.validate) and the reward terms' (so8t.rewards) run before
torch is imported; the optimizer class and LR schedule are checked when the run is built, before
any model is loaded (so8t.build.check_optimizer). A wrong override fails in seconds.
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
        from so8t.rewards import check_reward_config

        # The reward terms' functions and options (cheap: no torch for the built-ins); the optimizer
        # and LR schedule are checked first thing when the run is built (so8t.build.check_optimizer).
        problems = check_reward_config(cfg.reward)
        if problems:
            raise ConfigValidationError(problems)
    except ConfigValidationError as exc:
        log.error("%s", exc)
        return job_result(EXIT_REFUSED, run_dir_of_job())
    if cfg.get("preflight"):
        raise SystemExit(_preflight(cfg))
    from so8t.recipe import run_training

    return job_result(run_training(cfg), run_dir_of_job(), cfg.output.metrics_file, cfg.optimized_metric)


# Launchers that come with the `sweep` extra: the option names and the plugin they need.
_LAUNCHER_PLUGINS = {"parallel": "hydra_plugins.hydra_joblib_launcher", "joblib": "hydra_plugins.hydra_joblib_launcher",
                     "slurm": "hydra_plugins.hydra_submitit_launcher",
                     "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
                     "submitit_local": "hydra_plugins.hydra_submitit_launcher"}


def _missing_launcher(argv: list[str]) -> str | None:
    """The message for a chosen launcher whose plugin is not installed (Hydra's own error only
    says that a config was not found)."""
    import importlib.util

    for arg in argv:
        key, _, option = arg.partition("=")
        if key.lstrip("+") == "hydra/launcher" and option in _LAUNCHER_PLUGINS:
            try:
                found = importlib.util.find_spec(_LAUNCHER_PLUGINS[option]) is not None
            except ModuleNotFoundError:  # hydra_plugins itself is absent
                found = False
            if not found:
                return f"hydra/launcher={option} needs the sweep extra: pip install \"so8t[sweep]\""
    return None


def _preflight(cfg: DictConfig) -> int:
    """``+preflight=true``: print the memory estimate of this config and exit (0, or 2 when the
    model's config cannot be read or the adapters do not fit the model)."""
    from so8t.errors import ModelNotAvailableError, SetupError
    from so8t.preflight import report
    from so8t.recipe import EXIT_OK, EXIT_REFUSED

    device = str(cfg.hardware.device)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # The target device need not be present: the estimate is for it, whatever runs this.
        print(report(cfg, device), flush=True)
    except (ModelNotAvailableError, SetupError) as exc:
        log.error("%s", exc)
        return EXIT_REFUSED
    return EXIT_OK


def main() -> None:
    problem = _missing_launcher(sys.argv[1:])
    if problem:
        print(f"so8t-train: {problem}", file=sys.stderr)
        sys.exit(2)
    from so8t.distributed import hydra_overrides_for_rank

    # Under torchrun, ranks other than 0 log to train.rank<N>.log and leave .hydra/ to rank 0.
    sys.argv += hydra_overrides_for_rank()
    _run()


if __name__ == "__main__":
    # Run the entry point of the importable module, not of this __main__ copy, so that launchers
    # which pickle the task function (joblib, submitit) find it by name in their workers.
    from so8t.train import main as _main

    sys.exit(_main())
