"""Config registration: schemas, experiment presets and the naming resolvers.

Importing this module is cheap (no torch): config errors must be reported in seconds.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from so8t.config import schema
from so8t.config.identity import name_from_overrides, safe_name

# conf/ and experiments/ are shipped as the packages so8t.conf and so8t.experiments (see
# pyproject.toml), so they are found the same way in a wheel and in an editable install.
CONF_PACKAGE = "so8t.conf"
EXPERIMENTS_PACKAGE = "so8t.experiments"
CONF_DIR = Path(str(resources.files(CONF_PACKAGE)))
EXPERIMENTS_DIR = Path(str(resources.files(EXPERIMENTS_PACKAGE)))

_registered = False


def _auto_run_name() -> str:
    """Default ``run_name``: derived from this job's overrides (see so8t.config.identity)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "default"
    overrides = HydraConfig.get().overrides.task
    return with_fork_suffix(name_from_overrides(overrides), overrides)


def with_fork_suffix(name: str, overrides) -> str:
    """``resume=<path>`` starts a new history from another run's checkpoint: it gets a folder of
    its own (``fork-<source>-<hash of the source path>``), so it never writes over the run the
    name would otherwise find, and the same command finds the fork again to continue it."""
    import hashlib
    from pathlib import Path

    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key == "resume" and value not in ("", "auto", "never"):
            source = Path(value).expanduser().resolve()
            digest = hashlib.sha1(str(source).encode("utf-8")).hexdigest()[:8]
            fork = f"fork-{source.name}-{digest}"
            return safe_name(fork if name == "default" else f"{name},{fork}")
    return name


# Where the sweep folder's name is pinned once computed: a key in the master config's resolver
# cache, which Hydra copies into every job's config (``load_sweep_config`` → ``copy_cache``) and
# which travels with the config when a launcher pickles it to another process or host.
_SWEEP_NAME_PIN = "so8t_sweep_name:pinned"


def sweep_name_of(cfg: Any) -> str:
    """Name of a sweep folder: ``sweep_name`` when set, else the sweep's own overrides as typed
    (``seed=1,2 ppo.clip_range=0.1,0.2`` → ``ppo.clip_range=0.1,0.2,seed=1,2``) by the same rule
    as a run's default ``run_name``: result-neutral keys left out, order-independent,
    file-system-safe, hashed when long."""
    explicit = cfg.get("sweep_name") if hasattr(cfg, "get") else None
    if explicit not in (None, ""):
        return safe_name(str(explicit))
    overrides = list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])
    # A sweep defined in a config file (hydra.sweeper.params, e.g. in an experiment preset).
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if OmegaConf.is_dict(params):
        overrides += [f"{key}={value}" for key, value in params.items_ex(resolve=False)]
    return name_from_overrides(overrides)


def _auto_sweep_name(*, _root_: Any) -> str:
    """``${so8t_sweep_name:}``: the sweep folder's name, the same for every job of a sweep.

    Hydra resolves ``hydra.sweep.dir`` first on the sweep's master config, whose
    ``hydra.overrides.task`` holds the sweep's overrides as typed (``seed=1,2``); each job's
    config only holds that job's values (``seed=1``). So the name is computed on the master
    config and pinned in its resolver cache, which Hydra copies into each job's config, in this
    process (basic launcher) or another one (joblib workers, submitit jobs on a cluster).
    """
    cache = OmegaConf.get_cache(_root_)
    pinned = cache.get(_SWEEP_NAME_PIN)
    if pinned:
        return pinned[()]
    name = sweep_name_of(_root_)
    cache[_SWEEP_NAME_PIN] = {(): name}
    return name


def register() -> None:
    """Register schemas, experiment presets and resolvers with Hydra (idempotent)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=schema.TrainConfig)
    cs.store(group="adapter", name="so8_schema", node=schema.So8AdapterConfig)
    cs.store(group="adapter", name="lora_schema", node=schema.LoraAdapterConfig)
    cs.store(group="data", name="arithmetic_schema", node=schema.ArithmeticDataConfig)
    cs.store(group="data", name="jsonl_schema", node=schema.JsonlDataConfig)
    # Presets live in the top-level experiments/ folder, which is not a Hydra group folder;
    # registering them here is what makes `experiment=NAME` find them.
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        cs.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")
    from so8t.config.help import help_config

    cs.store(group="hydra/help", name="so8t", node=help_config(CONF_DIR, EXPERIMENTS_DIR))
    OmegaConf.register_new_resolver("so8t_run_name", _auto_run_name, replace=True)
    OmegaConf.register_new_resolver("so8t_sweep_name", _auto_sweep_name, replace=True)
    _registered = True
