"""Config registration: schemas, experiment presets and the naming resolvers.

Importing this module is cheap (no torch): config errors must be reported in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from so8t.config import schema
from so8t.config.identity import name_from_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENTS_DIR = REPO_ROOT / "experiments"

_registered = False


def _auto_run_name() -> str:
    """Default ``run_name``: derived from this job's overrides (see so8t.config.identity)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "default"
    return name_from_overrides(HydraConfig.get().overrides.task)


def _auto_sweep_name() -> str:
    """Default sweep folder name: the sweep's own overrides as typed on the command line.

    Each job only sees its own values in ``hydra.overrides.task``; the comma lists that define
    the sweep are only on the command line, so they are read from there.
    """
    args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    for arg in args:
        key, value = arg.split("=", 1)
        if key.lstrip("+") == "sweep_name":
            return name_from_overrides([f"x={value}"]).split("=", 1)[1]
    return name_from_overrides(args, default="sweep")


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
    OmegaConf.register_new_resolver("so8t_run_name", _auto_run_name, replace=True)
    OmegaConf.register_new_resolver("so8t_sweep_name", _auto_sweep_name, replace=True)
    _registered = True
