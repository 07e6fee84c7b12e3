"""Structured-config schema: one dataclass per config group, registered with Hydra.

The dataclasses make a wrong key, a wrong type or a value outside a choice fail while Hydra
composes the config, with a message that names the key (choices are Enums, so8t.config.choice:
``hardware.dtype=fp8`` is refused listing float32, bfloat16, float16). Group options whose shape
differs (``adapter=so8`` vs ``adapter=lora``, ``data=arithmetic`` vs ``data=jsonl``) each get
their own schema, which the YAML option extends through its defaults list; ``kind`` names the
option's type in every group.

Where each fact lives:

* **Defaults live in the YAML option files** (``conf/<group>/<option>.yaml``), each key with a
  comment above it: they are what a user reads and what ``docs/config-reference.md`` lists.
  Every option file sets every key of its group, so a field here has no default (``MISSING``)
  and there is nothing to disagree with; a composed config that lacks a value (a user's own
  option file that leaves a key out) is refused naming the key. Keys that several options share
  sit in one file of the group that each option pulls in through its defaults list
  (``checkpoint/_common.yaml``, ``logger/default.yaml``).
* **Types, choices and ranges live here**, beside each field: ``ranged(POSITIVE)`` records the
  valid range in the field's metadata, which one generic check reads
  (``so8t.config.validate.out_of_range``; OmegaConf runs no ``__post_init__`` on overrides,
  so ranges are checked on the typed config after composition).
* **Checks that relate several keys** (a mini-batch that must divide the rollout batch ...)
  live in ``so8t.config.validate``.

Exceptions, declared with defaults of their own: ``RewardTermConfig`` (a term added from the
command line, ``+reward.terms.NAME={_target_:...}``, takes them), ``RewardConfig`` and
``OptimizerConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from so8t.config.choice import Choice
from so8t.config.logger_schema import LoggerConfig


class ModelKind(Choice):
    tiny = "tiny"
    hub = "hub"
    local = "local"


class Quantization(Choice):
    none = "none"
    nf4 = "nf4"
    int8 = "int8"


class GateKind(Choice):
    constant = "constant"
    sigmoid = "sigmoid"


class KLKind(Choice):
    fixed = "fixed"
    adaptive = "adaptive"


class Cadence(Choice):
    time = "time"
    step = "step"
    both = "both"


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class MemoryCheck(Choice):
    error = "error"
    warn = "warn"
    off = "off"


class DistributedBackend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts; ``None`` (where the field allows it) is always accepted."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
UNIT_INTERVAL = Range(low=0, high=1)
PROBABILITY = Range(low=0, high=1, high_open=True)  # a dropout rate: 1 would drop everything


def ranged(valid: Range, default: Any = MISSING) -> Any:
    """A field whose valid numbers are ``valid`` (checked on the composed config)."""
    return field(default=default, metadata={"range": valid})


@dataclass
class ModelConfig:
    kind: ModelKind = MISSING
    path: Optional[str] = MISSING
    local_files_only: bool = MISSING
    trust_remote_code: bool = MISSING
    # bitsandbytes, CUDA only.
    quantization: Quantization = MISSING
    # Attention kernel passed to transformers: sdpa, eager, flash_attention_2 ...
    attn_implementation: str = MISSING


@dataclass
class GateConfig:
    kind: GateKind = MISSING
    start: float = MISSING
    target: float = MISSING
    steps: int = ranged(NON_NEGATIVE)
    steepness: float = MISSING


@dataclass
class So8AdapterConfig:
    kind: str = MISSING
    layers: Optional[List[int]] = MISSING
    init_std: float = ranged(NON_NEGATIVE)
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class LoraAdapterConfig:
    kind: str = MISSING
    r: int = ranged(POSITIVE)
    alpha: float = ranged(POSITIVE)
    dropout: float = ranged(PROBABILITY)
    target_modules: List[str] = MISSING


@dataclass
class KLConfig:
    kind: KLKind = MISSING
    init_coef: float = ranged(NON_NEGATIVE)
    target: float = ranged(NON_NEGATIVE)
    horizon: int = ranged(POSITIVE)


@dataclass
class SchedulerConfig:
    # A transformers SchedulerType name (transformers.get_scheduler), stepped once per PPO update;
    # its num_training_steps is max_steps.
    name: str = MISSING
    num_warmup_steps: int = ranged(NON_NEGATIVE)
    # Further arguments of that schedule (num_cycles, power, lr_end, min_lr_rate ...).
    scheduler_specific_kwargs: Dict[str, Any] = MISSING


@dataclass
class PPOConfig:
    rollout_batch_size: int = ranged(POSITIVE)
    mini_batch_size: int = ranged(POSITIVE)
    ppo_epochs: int = ranged(POSITIVE)
    max_new_tokens: int = ranged(POSITIVE)
    temperature: float = ranged(POSITIVE)
    gamma: float = ranged(UNIT_INTERVAL)
    lam: float = ranged(UNIT_INTERVAL)
    clip_range: float = ranged(POSITIVE)
    clip_range_value: float = ranged(POSITIVE)
    vf_coef: float = ranged(NON_NEGATIVE)
    ent_coef: float = ranged(NON_NEGATIVE)
    max_grad_norm: float = ranged(POSITIVE)
    whiten_advantages: bool = MISSING
    missing_eos_penalty: float = ranged(NON_NEGATIVE)
    stop_token_ids: List[int] = MISSING
    stop_strings: List[str] = MISSING
    # null: recompute whenever the compute dtype is not float32.
    recompute_old_logprobs: Optional[bool] = MISSING
    kl: KLConfig = field(default_factory=KLConfig)
    # A Hydra-instantiable torch.optim class: ``_target_`` and its own argument names (lr, betas ...).
    # Untyped because each optimizer class takes other arguments; the conf/ppo/optimizer group holds
    # presets and so8t.ppo.optim checks the arguments against the class's signature.
    optimizer: Dict[str, Any] = MISSING
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class RewardTermConfig:
    """The reserved keys of a reward term; the term's own options sit beside them (so a term
    node is untyped, see RewardConfig.terms), and so8t.rewards checks them against its function."""

    weight: float = 1.0
    # Dotted path of a reward function (a user's or one from ``trl.rewards``) or class.
    # Built-in terms leave it null and are found by their name.
    _target_: Optional[str] = None
    # true for a function: Hydra's instantiate binds the options into a functools.partial that
    # is called on every batch; absent for a class, which is instantiated once with them.
    _partial_: Optional[bool] = None


@dataclass
class RewardConfig:
    # Values are RewardTermConfig's keys plus the term's options; typed Any so that options can
    # sit beside the weight and `+reward.terms.NAME.weight=…` can add a term from the command
    # line. so8t.rewards checks each term before any model is loaded.
    terms: Dict[str, Any] = MISSING
    skip_special_tokens: bool = MISSING
    # Normalise the total reward by its running mean/std (so8t.rewards.normalize).
    normalize: bool = MISSING
    # Clip the (normalised) total reward to [-clip, clip]; null: no clipping.
    clip: Optional[float] = ranged(POSITIVE)


@dataclass
class ArithmeticDataConfig:
    kind: str = MISSING
    num_prompts: int = ranged(POSITIVE)
    # "3+-2=" is not a question anyone means, and the tiny tokenizer has no minus sign.
    min_operand: int = ranged(NON_NEGATIVE)
    max_operand: int = MISSING
    seed: int = MISSING
    system_prompt: Optional[str] = MISSING
    instruction: Optional[str] = MISSING
    # null: use the tokenizer's chat template when it has one; true/false force it.
    chat_template: Optional[bool] = MISSING
    max_prompt_tokens: Optional[int] = ranged(POSITIVE)


@dataclass
class JsonlDataConfig:
    kind: str = MISSING
    path: str = MISSING
    prompt_field: str = MISSING
    messages_field: Optional[str] = MISSING
    reference_field: Optional[str] = MISSING
    system_field: Optional[str] = MISSING
    system_prompt: Optional[str] = MISSING
    instruction: Optional[str] = MISSING
    # null: use the tokenizer's chat template when it has one; true/false force it.
    chat_template: Optional[bool] = MISSING
    max_prompt_tokens: Optional[int] = ranged(POSITIVE)


@dataclass
class CheckpointConfig:
    cadence: Cadence = MISSING
    every_seconds: float = ranged(POSITIVE)
    every_steps: int = ranged(POSITIVE)
    keep_last: int = ranged(POSITIVE)
    keep_every_steps: Optional[int] = ranged(POSITIVE)
    save_on_end: bool = MISSING
    async_write: bool = MISSING
    max_failed_saves: int = ranged(POSITIVE)
    max_unprotected: float = ranged(POSITIVE)


@dataclass
class HardwareConfig:
    # cpu, cuda, cuda:N or auto (checked in so8t.config.validate: a pattern, not a list).
    device: str = MISSING
    dtype: DType = MISSING
    num_threads: Optional[int] = ranged(POSITIVE)
    micro_batch_size: Optional[int] = ranged(POSITIVE)
    gradient_checkpointing: bool = MISSING
    memory_budget_gb: Optional[float] = ranged(POSITIVE)
    # What the memory preflight does with an over-budget config.
    memory_check: MemoryCheck = MISSING
    # Rows per sampling / reference / recompute chunk (None: the whole rollout batch).
    rollout_micro_batch_size: Optional[int] = ranged(POSITIVE)
    # Compute the layers below the first adapter once per rollout (cannot change results).
    frozen_prefix_reuse: bool = MISSING
    # torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU).
    distributed_backend: DistributedBackend = MISSING
    # Seconds a collective may wait for the other ranks before failing with an error.
    collective_timeout_s: float = ranged(POSITIVE)


@dataclass
class OutputConfig:
    # null: bars only when the output is a terminal.
    progress_bars: Optional[bool] = MISSING
    metrics_file: str = MISSING
    samples_file: str = MISSING
    samples_every: int = ranged(NON_NEGATIVE)
    samples_per_step: int = ranged(NON_NEGATIVE)


@dataclass
class PathsConfig:
    output_dir: str = MISSING


@dataclass
class TrainConfig:
    seed: int = MISSING
    max_steps: int = ranged(POSITIVE)
    experiment_name: str = MISSING
    run_name: str = MISSING
    sweep_name: Optional[str] = MISSING
    # auto, never or a checkpoint path, so a str rather than a choice.
    resume: str = MISSING
    max_wall_seconds: Optional[float] = ranged(POSITIVE)
    model: ModelConfig = MISSING
    # So8AdapterConfig or LoraAdapterConfig, by adapter.kind (OmegaConf has no union of
    # dataclasses): each option's YAML extends its schema, and so8t.config.typed converts it.
    adapter: Any = MISSING
    ppo: PPOConfig = MISSING
    reward: RewardConfig = MISSING
    # ArithmeticDataConfig or JsonlDataConfig, by data.kind (as adapter).
    data: Any = MISSING
    checkpoint: CheckpointConfig = MISSING
    hardware: HardwareConfig = MISSING
    output: OutputConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    # The metric a Hydra sweeper optimises (see so8t.sweep).
    optimized_metric: str = MISSING


# Schemas by group option kind, for the groups typed ``Any`` above.
ADAPTER_SCHEMAS = {"so8": So8AdapterConfig, "lora": LoraAdapterConfig}
DATA_SCHEMAS = {"arithmetic": ArithmeticDataConfig, "jsonl": JsonlDataConfig}
