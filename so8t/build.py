"""Build the trainer's components from a validated config (model, adapters, data, reward, PPO)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from so8t.errors import SetupError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"hardware.device={name} but CUDA is not available on this machine; use hardware=cpu "
                         "(or install a CUDA build of torch, see the README)")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SetupError(f"hardware.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def configure_hardware(hw_cfg, group=None) -> tuple[torch.device, torch.dtype]:
    if hw_cfg.num_threads:
        torch.set_num_threads(hw_cfg.num_threads)
    device = resolve_device(hw_cfg.device)
    if group is not None and group.enabled and device.type == "cuda" and device.index is None:
        # One GPU per rank of a node: the launcher's LOCAL_RANK picks it.
        device = resolve_device(f"cuda:{group.local_rank}")
    return device, DTYPES[hw_cfg.dtype]


def build_policy_and_tokenizer(model_cfg, adapter_cfg, device: torch.device, dtype: torch.dtype):
    from so8t.model.loading import load_base_model
    from so8t.model.policy import build_policy

    base, tokenizer = load_base_model(model_cfg, dtype=dtype, device=device)
    try:
        policy = build_policy(base, adapter_cfg)
    except ValueError as exc:  # e.g. a hidden size the SO(8) blocks cannot split, a layer out of range
        where = f"model.path={model_cfg.path}" if model_cfg.path else f"model.kind={model_cfg.kind}"
        raise SetupError(f"adapter={adapter_cfg.kind} does not fit the model ({where}): {exc}") from exc
    # (getattr: a model section that final/policy.json recorded before quantization existed lacks it.)
    if str(getattr(model_cfg, "quantization", "none")) == "none":
        # A quantised base is already on the device and must not be moved or cast (bitsandbytes
        # tensors); the adapters and value head are created on its device.
        policy.to(device)
    return policy, tokenizer


def build_gate_schedule(adapter_cfg):
    if adapter_cfg.kind != "so8":
        return None
    from so8t.model.gate import GateSchedule

    gate = adapter_cfg.gate
    return GateSchedule(gate.kind, gate.start, gate.target, gate.steps, gate.steepness)


def check_config(cfg) -> list[str]:
    """Problems only the code that builds the run can see, each naming its key (so8t.config.validate
    checks the rest): the reward terms (their functions and options) and the optimizer and LR schedule
    (:func:`check_optimizer`). so8t-train checks the reward terms with the config, the optimizer first
    thing in :func:`build_components`: both before any model is loaded."""
    from so8t.rewards import check_reward_config

    return [*check_reward_config(cfg.reward), *check_optimizer(cfg)]


def check_optimizer(cfg) -> list[str]:
    """Problems with the optimizer's class and arguments and the LR schedule. They need torch, so
    they run in build_components rather than with the config: re-running a completed run (a sweep
    run again) is then skipped without importing it."""
    from so8t.ppo.optim import check_optimizer_config, check_scheduler_config

    return [*check_optimizer_config(cfg.ppo.optimizer), *check_scheduler_config(cfg.ppo.scheduler, cfg.max_steps)]


@dataclass
class Components:
    trainer: object
    policy: object
    tokenizer: object
    device: torch.device
    # Which base model the run trains on (see so8t.model.fingerprint): part of the
    # checkpoints' identity, so a checkpoint is never resumed on other weights.
    base_fingerprint: dict


def build_components(cfg, group=None) -> Components:
    """``group``: this process's :class:`so8t.distributed.Group` (None: a lone process)."""
    from so8t.data.prompts import build_prompts
    from so8t.data.sampler import PromptSampler
    from so8t.distributed import Group, RankShard
    from so8t.model.quantization import check_quantization
    from so8t.ppo.kl import build_kl_controller
    from so8t.ppo.optim import build_lr_scheduler, build_optimizer
    from so8t.ppo.trainer import PPOTrainer
    from so8t.preflight import check_memory
    from so8t.rewards import build_reward
    from so8t.rewards.normalize import RewardNormalizer
    from so8t.run.console import library_bars

    problems = check_optimizer(cfg)
    if problems:  # before anything is loaded: exit 2, each message naming its key
        raise SetupError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
    library_bars(cfg.output.progress_bars)
    group = group or Group()
    device, dtype = configure_hardware(cfg.hardware, group)
    # Before any weight is loaded: a config that cannot run or cannot fit stops here.
    check_quantization(cfg.model.quantization, device)
    check_memory(cfg, device)
    seed_everything(cfg.seed)
    policy, tokenizer = build_policy_and_tokenizer(cfg.model, cfg.adapter, device, dtype)
    if cfg.hardware.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    try:
        prompts = build_prompts(cfg.data, tokenizer)
    except (OSError, ValueError) as exc:  # the messages name the data key, file and line
        raise SetupError(str(exc)) from exc
    sampler = PromptSampler(len(prompts), cfg.ppo.rollout_batch_size, seed=cfg.seed)
    if group.enabled:
        # The prompt sampler keeps cfg.seed on every rank, so all draw the same global batches;
        # each rank keeps its slice.
        sampler = RankShard(sampler, group)
    log.info("a prompt as the model sees it: %r", prompts[0].text)
    grad_scaler = None
    if dtype == torch.float16:
        # fp16 gradients of the frozen trunk underflow without loss scaling; bf16 and fp32
        # have the exponent range of fp32 and need none.
        grad_scaler = torch.amp.GradScaler(device.type)
    optimizer = build_optimizer(cfg.ppo.optimizer, policy.trainable_parameters())
    trainer = PPOTrainer(
        policy=policy,
        tokenizer=tokenizer,
        prompts=prompts,
        sampler=sampler,
        reward_fn=build_reward(cfg.reward),
        ppo_cfg=cfg.ppo,
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(optimizer, cfg.ppo.scheduler, cfg.max_steps),
        kl_controller=build_kl_controller(cfg.ppo.kl),
        gate_schedule=build_gate_schedule(cfg.adapter),
        micro_batch_size=cfg.hardware.micro_batch_size,
        device=device,
        skip_special_tokens=cfg.reward.skip_special_tokens,
        grad_scaler=grad_scaler,
        # Always a checkpointed part (the identity when off), so switching it on or off on a
        # resume finds the state it expects.
        reward_normalizer=RewardNormalizer(cfg.reward.normalize, cfg.reward.clip),
        samples_per_step=cfg.output.samples_per_step,
        rollout_micro_batch_size=cfg.hardware.rollout_micro_batch_size,
        frozen_prefix_reuse=cfg.hardware.frozen_prefix_reuse,
        group=group,
    )
    if group.enabled:
        # Every rank starts from rank 0's trainable weights (the value head's initialisation
        # draws from the RNG), then samples from its own stream.
        group.broadcast_tensors(policy.trainable_parameters())
        seed_everything(cfg.seed + group.rank)
    n_trainable = sum(p.numel() for p in policy.trainable_parameters())
    log.info("policy: %d trainable parameters (adapter %s + value head); %d prompts; stop token ids %s%s",
             n_trainable, cfg.adapter.kind, len(prompts), trainer.stop_ids,
             "; old log-probs recomputed with the training forward" if trainer.recompute_old_logprobs else "")
    from so8t.model.fingerprint import base_model_fingerprint

    return Components(trainer=trainer, policy=policy, tokenizer=tokenizer, device=device,
                      base_fingerprint=base_model_fingerprint(cfg.model))
