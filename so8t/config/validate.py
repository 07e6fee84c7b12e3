"""Checks of a composed config, run before any model is built; ``validate`` returns it typed.

Hydra and the dataclass schema already reject unknown keys, wrong types and values outside a
choice while composing. What is left is checked here, every message naming the key:

* keys added with ``+key=value`` (they bypass Hydra's struct check) and the per-kind shape of
  ``adapter`` and ``data`` (typed ``Any`` at the top level);
* ranges: one generic check (:func:`out_of_range`) of the ranges recorded beside each field
  in so8t.config.schema;
* what relates several keys (batch sizes that must divide, a sigmoid gate that needs steps,
  a path that a model kind needs ...) and a few formats (a device name, stop strings).

What only the domain code can judge is checked there, still before any model is loaded: a reward
term's function and options by so8t.rewards (so8t-train calls it right after this), the
optimizer class, its arguments and the LR schedule when the run is built (so8t.build).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from so8t.config import schema
from so8t.config.schema import ADAPTER_SCHEMAS, DATA_SCHEMAS, TrainConfig


class ConfigValidationError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _unknown_keys(node: Any, expected: Any, prefix: str = "") -> list[str]:
    unknown = []
    for key in node.keys():
        if key not in list(expected.keys()):
            unknown.append(f"{prefix}{key}")
        elif (not OmegaConf.is_missing(expected, key) and isinstance(node[key], DictConfig)
              and isinstance(expected[key], DictConfig) and expected[key].keys()):
            unknown.extend(_unknown_keys(node[key], expected[key], f"{prefix}{key}."))
    return unknown


def _check_kind_schema(node: Any, group: str, schemas: dict, problems: list[str]) -> None:
    """Re-check a group typed ``Any`` in the top-level schema against its option's dataclass."""
    kind = node.get("kind") if isinstance(node, DictConfig) else None
    if kind not in schemas:
        problems.append(f"{group}.kind={kind!r} is not one of {sorted(schemas)}")
        return
    expected = OmegaConf.structured(schemas[kind])
    for key in _unknown_keys(node, expected):
        problems.append(f"{group}.{key} is not a key of {group}={kind} (allowed: see {schemas[kind].__name__})")
    try:
        OmegaConf.merge(expected, node)
    except Exception as exc:  # omegaconf raises several error types; all mean a bad key or type
        msg = str(exc).splitlines()[0]
        problems.append(f"{group}: {msg} (full key: {group}.{getattr(exc, 'full_key', '?')})")


def out_of_range(config: Any, prefix: str = "") -> list[str]:
    """Every field of a typed config whose value lies outside the range its schema records
    (``ranged(...)`` in so8t.config.schema); null is accepted wherever the field allows it."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            problems.extend(out_of_range(value, f"{prefix}{f.name}."))
            continue
        valid = f.metadata.get("range")
        if valid is not None and value is not None and not valid.contains(value):
            problems.append(f"{prefix}{f.name}={value} must be {valid.describe()}")
    return problems


# --------------------------------------------------------------------------- the optimizer


# --------------------------------------------------------------------------- the composed config


def _skeleton(cls: type) -> Any:
    """An instance of a schema dataclass whose nested dataclass fields are instances too, so
    that every known key shows (a field's values stay MISSING)."""
    hints = typing.get_type_hints(cls)
    nested = {f.name: _skeleton(hints[f.name]) for f in dataclasses.fields(cls)
              if dataclasses.is_dataclass(hints[f.name])}
    return cls(**nested)


def _check_composed(cfg: DictConfig, problems: list[str]) -> None:
    """What must hold before the config can be typed: known keys, per-kind shapes, set values."""
    # `+key=value` overrides bypass Hydra's struct check, so unknown keys are looked for here too.
    for key in _unknown_keys(cfg, OmegaConf.structured(_skeleton(TrainConfig))):
        if key.split(".", 1)[0] not in ("adapter", "data", "hydra", "preflight"):
            problems.append(f"{key} is not a known config key")
    if "preflight" in cfg and not isinstance(cfg.preflight, bool):
        problems.append(f"preflight={cfg.preflight!r} must be true or false (+preflight=true prints the memory "
                        "estimate and exits)")
    _check_kind_schema(cfg.adapter, "adapter", ADAPTER_SCHEMAS, problems)
    _check_kind_schema(cfg.data, "data", DATA_SCHEMAS, problems)
    if cfg.data.get("kind") == "jsonl" and OmegaConf.is_missing(cfg.data, "path"):
        problems.append("data.path must be set for data=jsonl (data.path=/path/to/prompts.jsonl)")
    if cfg.model.kind in ("hub", "local") and (OmegaConf.is_missing(cfg.model, "path") or not cfg.model.path):
        problems.append(f"model.path must be set for model.kind={cfg.model.kind}")


# --------------------------------------------------------------------------- the typed config


def _check_ppo(config: TrainConfig, problems: list[str]) -> None:
    ppo = config.ppo
    for i, token_id in enumerate(ppo.stop_token_ids):
        if token_id < 0:
            problems.append(f"ppo.stop_token_ids[{i}]={token_id} must be a token id >= 0")
    for i, text in enumerate(ppo.stop_strings):
        if not text:
            problems.append(f"ppo.stop_strings[{i}] is empty; an empty stop string would end every response at once")
    rollout, mini = ppo.rollout_batch_size, ppo.mini_batch_size
    if rollout > 0 and mini > 0 and rollout % mini:
        problems.append(f"ppo.mini_batch_size={mini} must divide ppo.rollout_batch_size={rollout}")
    micro = config.hardware.micro_batch_size
    if micro is not None and micro > 0 and mini > 0 and mini % micro:
        problems.append(f"hardware.micro_batch_size={micro} must divide ppo.mini_batch_size={mini}")


def _check_adapter(config: TrainConfig, problems: list[str]) -> None:
    adapter = config.adapter
    if isinstance(adapter, schema.So8AdapterConfig):
        if adapter.gate.kind == schema.GateKind.sigmoid and adapter.gate.steps <= 0:
            problems.append("adapter.gate.steps must be > 0 for a sigmoid gate schedule")
    elif not adapter.target_modules:
        problems.append("adapter.target_modules must name at least one module")


def _check_data(config: TrainConfig, problems: list[str]) -> None:
    data = config.data
    if isinstance(data, schema.ArithmeticDataConfig) and data.max_operand < data.min_operand:
        problems.append(f"data.max_operand={data.max_operand} must be >= data.min_operand={data.min_operand}")


def _check_model(config: TrainConfig, problems: list[str]) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_./\-]+", config.model.attn_implementation):
        problems.append(f"model.attn_implementation={config.model.attn_implementation!r} must name an attention "
                        "implementation of transformers (sdpa, eager, flash_attention_2 ...)")


def _check_hardware(config: TrainConfig, problems: list[str]) -> None:
    device = config.hardware.device
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        problems.append(f"hardware.device={device!r} must be cpu, cuda, cuda:N or auto")


def _check_logger(config: TrainConfig, problems: list[str]) -> None:
    """Tracker backends whose package is installed: a missing one fails in seconds, before any
    model is loaded, with the command that installs it."""
    import importlib.util

    from so8t.config.logger_schema import TRACKER_PACKAGES

    for backend in config.logger.backends:
        package = TRACKER_PACKAGES.get(backend)
        if package is not None and importlib.util.find_spec(package) is None:
            problems.append(f"logger.backends lists {backend!r}, but the {package} package is "
                            f"not installed: pip install \"so8t[{backend}]\"")


def validate(cfg: DictConfig) -> TrainConfig:
    """The composed config, checked and typed (see so8t.config.typed); raises
    ConfigValidationError listing every problem found, each naming its key."""
    from so8t.config.typed import to_train_config

    problems: list[str] = []
    _check_composed(cfg, problems)
    if problems:
        raise ConfigValidationError(problems)
    try:
        config = to_train_config(cfg)
    except MissingMandatoryValue as exc:  # a user's own option file that leaves a key out
        raise ConfigValidationError([f"{exc.full_key} is not set"]) from None
    problems.extend(out_of_range(config))
    if not config.run_name.strip():
        problems.append("run_name must not be empty")
    for check in (_check_model, _check_adapter, _check_ppo, _check_data, _check_hardware, _check_logger):
        check(config, problems)
    if problems:
        raise ConfigValidationError(problems)
    return config
