"""``so8t-train``: compose the config, validate it, build the run and train.

Nothing else lives here: the run's orchestration is in so8t.recipe, the PPO in so8t.ppo.
Hydra composes a ``DictConfig``; validation turns it into the typed ``TrainConfig`` once, here,
and that object is what the rest of the run reads (see so8t.config.typed).
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
from so8t.config.schema import TrainConfig
from so8t.config.validate import ConfigValidationError, validate

log = logging.getLogger("so8t.train")

register()


# Set once Hydra has composed a config and handed it to a job: an exit before that is Hydra
# refusing the command line (see main).
_composed = False


@hydra.main(config_path=f"pkg://{CONF_PACKAGE}", config_name="train", version_base="1.3")
def _run(cfg: DictConfig) -> float:
    """One run (or one job of a ``-m`` sweep); returns the objective, the final mean reward."""
    global _composed
    _composed = True
    from so8t.exit_codes import ExitCode
    from so8t.recipe import run_dir_of_job
    from so8t.sweep import job_result

    try:
        config = validate(cfg)
        from so8t.rewards import check_reward_config

        # The reward terms' functions and options (cheap: no torch for the built-ins); the optimizer
        # and LR schedule are checked first thing when the run is built (so8t.build.check_optimizer).
        problems = check_reward_config(cfg.reward)
        if problems:
            raise ConfigValidationError(problems)
    except ConfigValidationError as exc:
        log.error("%s", exc)
        return job_result(ExitCode.REFUSED, run_dir_of_job())
    if cfg.get("preflight"):  # `+preflight=true` is a command, not part of the run's config
        raise SystemExit(_preflight(config))
    from so8t.recipe import run_training

    return job_result(run_training(config), run_dir_of_job(), config.output.metrics_file, config.optimized_metric)


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


def _renamed_key(argv: list[str]) -> str | None:
    """The message for an override of a key that was renamed (Hydra's own error only says
    that the old key is not in the config)."""
    from so8t.config.identity import RENAMED_KEYS

    for arg in argv:
        key = arg.partition("=")[0].lstrip("+~")
        if key in RENAMED_KEYS:
            return f"{key} is now called {RENAMED_KEYS[key]}: {arg.replace(key, RENAMED_KEYS[key], 1)}"
    return None


def _preflight(cfg: TrainConfig) -> int:
    """``+preflight=true``: print the memory estimate of this config and exit (0, or 2 when the
    model's config cannot be read or the adapters do not fit the model)."""
    from so8t.errors import ModelNotAvailableError, SetupError
    from so8t.exit_codes import ExitCode
    from so8t.preflight import report

    device = str(cfg.hardware.device)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # The target device need not be present: the estimate is for it, whatever runs this.
        print(report(cfg, device), flush=True)
    except (ModelNotAvailableError, SetupError) as exc:
        log.error("%s", exc)
        return ExitCode.REFUSED
    return ExitCode.OK


def main() -> None:
    problem = _missing_launcher(sys.argv[1:]) or _renamed_key(sys.argv[1:])
    if problem:
        print(f"so8t-train: {problem}", file=sys.stderr)
        from so8t.exit_codes import ExitCode

        sys.exit(ExitCode.REFUSED)
    from so8t.distributed import hydra_overrides_for_rank

    # Under torchrun, ranks other than 0 log to train.rank<N>.log and leave .hydra/ to rank 0.
    sys.argv += hydra_overrides_for_rank()
    try:
        _run()
    except SystemExit as exc:
        # Hydra prints why it cannot compose the command's config (an unknown key, a value
        # outside a choice, a missing option) and exits 1, the code of a crash; it is a refused
        # input. A sweep's own exit 1 (failed jobs, -m) is left as it is: its jobs may run elsewhere.
        if exc.code == 1 and not _composed and not _is_multirun(sys.argv[1:]):
            from so8t.exit_codes import ExitCode

            sys.exit(ExitCode.REFUSED)
        raise


def _is_multirun(argv: list[str]) -> bool:
    return any(arg in ("-m", "--multirun") or arg.startswith("hydra.mode=MULTIRUN") for arg in argv)


if __name__ == "__main__":
    # Run the entry point of the importable module, not of this __main__ copy, so that launchers
    # which pickle the task function (joblib, submitit) find it by name in their workers.
    from so8t.train import main as _main

    sys.exit(_main())
