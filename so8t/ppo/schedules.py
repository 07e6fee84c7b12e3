"""Learning-rate schedule over PPO updates (a torch LambdaLR, so it checkpoints itself)."""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, kind: str, warmup_steps: int, total_steps: int) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"ppo.optimizer.lr_schedule={kind!r} must be constant, linear or cosine")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, opt_cfg,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    kind, warmup = opt_cfg.lr_schedule, opt_cfg.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, kind, warmup, total_steps)
    )
