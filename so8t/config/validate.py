"""Semantic checks of a composed config, run before any model is built.

Hydra and the dataclass schema already reject unknown keys and wrong types; this module
rejects well-typed values that make no sense (a temperature <= 0, batch sizes that do not
divide ...). Every message names the key. What only the domain code can judge is checked
there, still before any model is loaded: a reward term's function and options by so8t.rewards
(so8t-train runs it right after this), the optimizer class and the LR schedule by
so8t.build.check_optimizer (first thing when the run is built).
"""

from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from so8t.config import schema
from so8t.config.schema import ADAPTER_SCHEMAS, DATA_SCHEMAS


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


def _check_kind_schema(node: Any, group: str, kind_key: str, schemas: dict, problems: list[str]) -> None:
    """Re-check a group typed ``Any`` in the top-level schema against its option's dataclass."""
    kind = node.get(kind_key) if isinstance(node, DictConfig) else None
    if kind not in schemas:
        problems.append(f"{group}.{kind_key}={kind!r} is not one of {sorted(schemas)}")
        return
    expected = OmegaConf.structured(schemas[kind])
    for key in _unknown_keys(node, expected):
        problems.append(f"{group}.{key} is not a key of {group}={kind} (allowed: see {schemas[kind].__name__})")
    try:
        OmegaConf.merge(expected, node)
    except Exception as exc:  # omegaconf raises several error types; all mean a bad key or type
        msg = str(exc).splitlines()[0]
        problems.append(f"{group}: {msg} (full key: {group}.{getattr(exc, 'full_key', '?')})")


def _positive(cfg: DictConfig, key: str, problems: list[str], allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        need = ">= 0" if allow_zero else "> 0"
        problems.append(f"{key}={value} must be {need}")


def _in_unit_interval(cfg: DictConfig, key: str, problems: list[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if not 0.0 <= value <= 1.0:
        problems.append(f"{key}={value} must be in [0, 1]")


def _one_of(cfg: DictConfig, key: str, choices: tuple, problems: list[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        problems.append(f"{key}={value!r} must be one of {list(choices)}")


def _check_ppo(cfg: DictConfig, problems: list[str]) -> None:
    for key in ("ppo.rollout_batch_size", "ppo.mini_batch_size", "ppo.ppo_epochs", "ppo.max_new_tokens",
                "ppo.temperature", "ppo.clip_range", "ppo.clip_range_value", "ppo.max_grad_norm",
                "ppo.kl.horizon"):
        _positive(cfg, key, problems)
    for key in ("ppo.vf_coef", "ppo.ent_coef", "ppo.missing_eos_penalty", "ppo.kl.init_coef",
                "ppo.kl.target"):
        _positive(cfg, key, problems, allow_zero=True)
    _in_unit_interval(cfg, "ppo.gamma", problems)
    _in_unit_interval(cfg, "ppo.lam", problems)
    _one_of(cfg, "ppo.kl.kind", ("fixed", "adaptive"), problems)
    for i, token_id in enumerate(cfg.ppo.stop_token_ids):
        if token_id < 0:
            problems.append(f"ppo.stop_token_ids[{i}]={token_id} must be a token id >= 0")
    for i, text in enumerate(cfg.ppo.stop_strings):
        if not text:
            problems.append(f"ppo.stop_strings[{i}] is empty; an empty stop string would end every response at once")
    rollout, mini = cfg.ppo.rollout_batch_size, cfg.ppo.mini_batch_size
    if rollout > 0 and mini > 0 and rollout % mini:
        problems.append(f"ppo.mini_batch_size={mini} must divide ppo.rollout_batch_size={rollout}")
    micro = cfg.hardware.micro_batch_size
    if micro is not None:
        if micro <= 0:
            problems.append(f"hardware.micro_batch_size={micro} must be > 0")
        elif mini > 0 and mini % micro:
            problems.append(f"hardware.micro_batch_size={micro} must divide ppo.mini_batch_size={mini}")


def _check_adapter(cfg: DictConfig, problems: list[str]) -> None:
    adapter = cfg.adapter
    _check_kind_schema(adapter, "adapter", "kind", ADAPTER_SCHEMAS, problems)
    if adapter.get("kind") == "so8":
        _one_of(cfg, "adapter.gate.kind", ("constant", "sigmoid"), problems)
        _positive(cfg, "adapter.init_std", problems, allow_zero=True)
        _positive(cfg, "adapter.gate.steps", problems, allow_zero=True)
        if adapter.gate.kind == "sigmoid" and adapter.gate.steps <= 0:
            problems.append("adapter.gate.steps must be > 0 for a sigmoid gate schedule")
    elif adapter.get("kind") == "lora":
        _positive(cfg, "adapter.r", problems)
        _positive(cfg, "adapter.alpha", problems)
        dropout = adapter.dropout
        if not 0.0 <= dropout < 1.0:
            problems.append(f"adapter.dropout={dropout} must be in [0, 1)")
        if not adapter.target_modules:
            problems.append("adapter.target_modules must name at least one module")


def _check_data(cfg: DictConfig, problems: list[str]) -> None:
    _check_kind_schema(cfg.data, "data", "source", DATA_SCHEMAS, problems)
    if cfg.data.get("source") in DATA_SCHEMAS:
        _positive(cfg, "data.max_prompt_tokens", problems)
    if cfg.data.get("source") == "arithmetic":
        _positive(cfg, "data.num_prompts", problems)
        _positive(cfg, "data.min_operand", problems, allow_zero=True)
        if cfg.data.max_operand < cfg.data.min_operand:
            problems.append(f"data.max_operand={cfg.data.max_operand} must be >= "
                            f"data.min_operand={cfg.data.min_operand}")
    elif cfg.data.get("source") == "jsonl":
        if OmegaConf.is_missing(cfg.data, "path"):
            problems.append("data.path must be set for data=jsonl (data.path=/path/to/prompts.jsonl)")


def _check_model(cfg: DictConfig, problems: list[str]) -> None:
    _one_of(cfg, "model.source", ("tiny", "hub", "local"), problems)
    _one_of(cfg, "model.quantization", ("none", "nf4", "int8"), problems)
    if not re.fullmatch(r"[A-Za-z0-9_./\-]+", str(cfg.model.attn_implementation)):
        problems.append(f"model.attn_implementation={cfg.model.attn_implementation!r} must name an attention "
                        "implementation of transformers (sdpa, eager, flash_attention_2 ...)")
    if cfg.model.source in ("hub", "local") and (OmegaConf.is_missing(cfg.model, "path") or not cfg.model.path):
        problems.append(f"model.path must be set for model.source={cfg.model.source}")


def _check_hardware(cfg: DictConfig, problems: list[str]) -> None:
    device = cfg.hardware.device
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", str(device)):
        problems.append(f"hardware.device={device!r} must be cpu, cuda, cuda:N or auto")
    _one_of(cfg, "hardware.dtype", ("float32", "bfloat16", "float16"), problems)
    if cfg.hardware.num_threads is not None:
        _positive(cfg, "hardware.num_threads", problems)
    _positive(cfg, "hardware.memory_budget_gb", problems)
    _one_of(cfg, "hardware.memory_check", ("error", "warn", "off"), problems)
    _positive(cfg, "hardware.rollout_micro_batch_size", problems)
    _one_of(cfg, "hardware.distributed_backend", ("auto", "nccl", "gloo"), problems)
    _positive(cfg, "hardware.collective_timeout_s", problems)


def _check_checkpoint(cfg: DictConfig, problems: list[str]) -> None:
    _one_of(cfg, "checkpoint.policy", ("time", "step", "both"), problems)
    _positive(cfg, "checkpoint.every_seconds", problems)
    _positive(cfg, "checkpoint.every_steps", problems)
    _positive(cfg, "checkpoint.keep_last", problems)
    _positive(cfg, "checkpoint.keep_every_steps", problems)
    _positive(cfg, "checkpoint.max_failed_saves", problems)
    _positive(cfg, "checkpoint.max_unprotected", problems)


def _check_reward(cfg: DictConfig, problems: list[str]) -> None:
    # The terms themselves (their functions and options) are checked by so8t.rewards, which
    # so8t-train runs after this, still before any model is loaded.
    _positive(cfg, "reward.clip", problems)


def _check_logger(cfg: DictConfig, problems: list[str]) -> None:
    """Known tracker backends whose package is installed: a missing one fails in seconds,
    before any model is loaded, with the command that installs it."""
    import importlib.util

    from so8t.config.logger_schema import TRACKER_BACKENDS, TRACKER_PACKAGES

    for backend in cfg.logger.backends:
        if backend not in TRACKER_BACKENDS:
            problems.append(f"logger.backends: {backend!r} is not one of {list(TRACKER_BACKENDS)}")
        elif backend in TRACKER_PACKAGES and importlib.util.find_spec(TRACKER_PACKAGES[backend]) is None:
            problems.append(f"logger.backends lists {backend!r}, but the {TRACKER_PACKAGES[backend]} package is "
                            f"not installed: pip install \"so8t[{backend}]\"")
    _one_of(cfg, "logger.wandb.mode", (None, "online", "offline", "disabled"), problems)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigValidationError listing every problem found, each naming its key."""
    problems: list[str] = []
    # `+key=value` overrides bypass Hydra's struct check, so unknown keys are looked for here too.
    top = OmegaConf.structured(schema.TrainConfig(
        model=schema.ModelConfig(), ppo=schema.PPOConfig(), reward=schema.RewardConfig(),
        checkpoint=schema.CheckpointConfig(), hardware=schema.HardwareConfig(), output=schema.OutputConfig(),
        logger=schema.LoggerConfig(), paths=schema.PathsConfig(),
    ))
    for key in _unknown_keys(cfg, top):
        if key.split(".", 1)[0] not in ("adapter", "data", "hydra", "preflight"):
            problems.append(f"{key} is not a known config key")
    if "preflight" in cfg and not isinstance(cfg.preflight, bool):
        problems.append(f"preflight={cfg.preflight!r} must be true or false (+preflight=true prints the memory "
                        "estimate and exits)")
    _positive(cfg, "max_steps", problems)
    _positive(cfg, "max_wall_seconds", problems)
    if not str(cfg.run_name).strip():
        problems.append("run_name must not be empty")
    for check in (_check_model, _check_adapter, _check_ppo, _check_reward, _check_data,
                  _check_hardware, _check_checkpoint):
        check(cfg, problems)
    _positive(cfg, "output.samples_every", problems, allow_zero=True)
    _positive(cfg, "output.samples_per_step", problems, allow_zero=True)
    _check_logger(cfg, problems)
    if problems:
        raise ConfigValidationError(problems)
