"""Structured-config schema: one dataclass per config group, registered with Hydra.

The dataclasses make a wrong key or a wrong type fail while Hydra composes the config,
with a message that names the key. Group options whose shape differs (``adapter=so8`` vs
``adapter=lora``, ``data=arithmetic`` vs ``data=jsonl``) each get their own schema, which
the YAML option extends through its defaults list.

Semantic checks (values that are well-typed but make no sense together) live in
``so8t.config.validate``; this module only declares shapes and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from so8t.config.logger_schema import LoggerConfig


@dataclass
class ModelConfig:
    source: str = "tiny"
    path: Optional[str] = None
    local_files_only: bool = True
    trust_remote_code: bool = False
    # none | nf4 | int8 (bitsandbytes, CUDA only).
    quantization: str = "none"
    # Attention kernel passed to transformers: sdpa, eager, flash_attention_2 ...
    attn_implementation: str = "sdpa"


@dataclass
class GateConfig:
    kind: str = "constant"
    start: float = 1.0
    target: float = 1.0
    steps: int = 0
    steepness: float = 10.0


@dataclass
class So8AdapterConfig:
    kind: str = "so8"
    layers: Optional[List[int]] = None
    init_std: float = 0.0
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class LoraAdapterConfig:
    kind: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["qkv_proj", "o_proj", "lm_head"])


@dataclass
class KLConfig:
    kind: str = "fixed"
    init_coef: float = 0.05
    target: float = 6.0
    horizon: int = 10000


@dataclass
class SchedulerConfig:
    # A transformers SchedulerType name (transformers.get_scheduler), stepped once per PPO update;
    # its num_training_steps is max_steps.
    name: str = "constant"
    num_warmup_steps: int = 0
    # Further arguments of that schedule (num_cycles, power, lr_end, min_lr_rate ...).
    scheduler_specific_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PPOConfig:
    rollout_batch_size: int = 32
    mini_batch_size: int = 8
    ppo_epochs: int = 4
    max_new_tokens: int = 12
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0
    stop_token_ids: List[int] = field(default_factory=list)
    stop_strings: List[str] = field(default_factory=list)
    # null: recompute whenever the compute dtype is not float32.
    recompute_old_logprobs: Optional[bool] = None
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
    terms: Dict[str, Any] = field(default_factory=dict)
    skip_special_tokens: bool = True
    # Normalise the total reward by its running mean/std (so8t.rewards.normalize).
    normalize: bool = False
    # Clip the (normalised) total reward to [-clip, clip]; null: no clipping.
    clip: Optional[float] = None


# The tiny default's request for the rewarded format; its words are in the tiny vocabulary.
DEFAULT_SYSTEM_PROMPT = "Answer in the form <think>reasoning</think><final>the sum</final>."
DEFAULT_INSTRUCTION = "Add the two numbers:"


@dataclass
class ArithmeticDataConfig:
    source: str = "arithmetic"
    num_prompts: int = 100
    min_operand: int = 0
    max_operand: int = 9
    seed: int = 1234
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT
    instruction: Optional[str] = DEFAULT_INSTRUCTION
    # null: use the tokenizer's chat template when it has one; true/false force it.
    chat_template: Optional[bool] = None
    max_prompt_tokens: Optional[int] = None


@dataclass
class JsonlDataConfig:
    source: str = "jsonl"
    path: str = MISSING
    prompt_field: str = "prompt"
    messages_field: Optional[str] = "messages"
    reference_field: Optional[str] = "reference"
    system_field: Optional[str] = "system"
    system_prompt: Optional[str] = None
    instruction: Optional[str] = None
    # null: use the tokenizer's chat template when it has one; true/false force it.
    chat_template: Optional[bool] = None
    max_prompt_tokens: Optional[int] = 256


@dataclass
class CheckpointConfig:
    policy: str = "both"
    every_seconds: float = 180.0
    every_steps: int = 20
    keep_last: int = 5
    keep_every_steps: Optional[int] = None
    save_on_end: bool = True
    async_write: bool = True
    max_failed_saves: int = 5
    max_unprotected: float = 3.0


@dataclass
class HardwareConfig:
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: Optional[int] = 2
    micro_batch_size: Optional[int] = None
    gradient_checkpointing: bool = False
    memory_budget_gb: Optional[float] = None
    # error | warn | off: what the memory preflight does with an over-budget config.
    memory_check: str = "error"
    # Rows per sampling / reference / recompute chunk (None: the whole rollout batch).
    rollout_micro_batch_size: Optional[int] = None
    # Compute the layers below the first adapter once per rollout (cannot change results).
    frozen_prefix_reuse: bool = True
    # torch.distributed backend under torchrun: auto (nccl on CUDA, gloo on CPU), nccl or gloo.
    distributed_backend: str = "auto"
    # Seconds a collective may wait for the other ranks before failing with an error.
    collective_timeout_s: float = 600.0


@dataclass
class OutputConfig:
    # null: bars only when the output is a terminal.
    progress_bars: Optional[bool] = None
    metrics_file: str = "metrics.jsonl"
    samples_file: str = "samples.jsonl"
    samples_every: int = 10
    samples_per_step: int = 4


@dataclass
class PathsConfig:
    output_dir: str = "outputs"


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 60
    experiment_name: str = "default"
    run_name: str = MISSING
    sweep_name: Optional[str] = None
    resume: str = "auto"
    max_wall_seconds: Optional[float] = None
    model: ModelConfig = MISSING
    adapter: Any = MISSING
    ppo: PPOConfig = MISSING
    reward: RewardConfig = MISSING
    data: Any = MISSING
    checkpoint: CheckpointConfig = MISSING
    hardware: HardwareConfig = MISSING
    output: OutputConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    # The metric a Hydra sweeper optimises (see so8t.sweep).
    optimized_metric: str = "reward/mean"


# Schemas by group option kind, used by validation to re-check nodes typed ``Any`` above.
ADAPTER_SCHEMAS = {"so8": So8AdapterConfig, "lora": LoraAdapterConfig}
DATA_SCHEMAS = {"arithmetic": ArithmeticDataConfig, "jsonl": JsonlDataConfig}
