"""The two forms a run's config takes after composition, and the one place each is made.

* **Typed** — :class:`so8t.config.schema.TrainConfig`, dataclass instances with Enum choices:
  what every part of the run reads (attribute access, nothing else). It is made once, at the
  entry point: ``so8t.config.validate.validate`` checks the composed ``DictConfig`` and returns
  :func:`to_train_config` of it; ``so8t-train`` passes that object down.
* **Record** — :func:`config_record`, plain JSON-able dicts and lists with each choice as its
  string: what records and hashes read, so they hold exactly what the YAML says. The config
  identity in checkpoints and session.json (``so8t.config.identity.config_identity``), the
  trackers' hyperparameters and ``final/policy.json`` are made from it; Hydra's own ``.hydra/``
  copy is the composed config as Hydra wrote it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from so8t.config import schema

# The schema of each group, by option kind for the groups whose options differ in shape.
GROUP_SCHEMAS: dict[str, Any] = {
    "model": schema.ModelConfig, "ppo": schema.PPOConfig, "reward": schema.RewardConfig,
    "checkpoint": schema.CheckpointConfig, "hardware": schema.HardwareConfig, "output": schema.OutputConfig,
    "logger": schema.LoggerConfig, "paths": schema.PathsConfig,
    "adapter": schema.ADAPTER_SCHEMAS, "data": schema.DATA_SCHEMAS,
}
_TOP_KEYS = tuple(schema.TrainConfig.__dataclass_fields__)


def schema_of(group: str, node: Any) -> type:
    """The dataclass a group's node follows (by its ``kind`` for adapter and data)."""
    found = GROUP_SCHEMAS[group]
    return found[node["kind"]] if isinstance(found, dict) else found


def group_config(group: str, node: Any) -> Any:
    """One group's node (a DictConfig or a plain mapping) as its schema's dataclass instance."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_of(group, node)), node))


def to_train_config(cfg: DictConfig) -> schema.TrainConfig:
    """The composed config as a TrainConfig (interpolations resolved, choices as Enums).

    Keys outside the schema (``+preflight=true``, Hydra's own node) are left out; the caller
    has checked the config (so8t.config.validate)."""
    node = cfg.copy()
    with open_dict(node):
        for key in [k for k in node.keys() if k not in _TOP_KEYS]:
            del node[key]
    # The per-kind schema of adapter and data, whatever the option file extended.
    node.adapter = OmegaConf.merge(OmegaConf.structured(schema_of("adapter", cfg.adapter)), cfg.adapter)
    node.data = OmegaConf.merge(OmegaConf.structured(schema_of("data", cfg.data)), cfg.data)
    return OmegaConf.to_object(node)


def config_record(config: Any) -> dict[str, Any]:
    """A TrainConfig (or any part of it, or a DictConfig) as plain JSON-able data."""
    node = config if OmegaConf.is_config(config) else OmegaConf.structured(config)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def option_config(group: str, option: str, **values: Any) -> Any:
    """The typed config of one group option: the values of its YAML file, then ``values``
    (``option_config("data", "arithmetic", num_prompts=5)``) — for scripts and tests that need
    one group without a whole run."""
    from hydra import compose, initialize_config_dir

    from so8t.config import CONF_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}"])
    return group_config(group, OmegaConf.merge(cfg[group], values))
