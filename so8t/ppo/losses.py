"""Clipped PPO policy and value losses on per-token tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from so8t.ppo.advantages import masked_mean


@dataclass
class LossParts:
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    value_clip_fraction: torch.Tensor
    ratio_max_dev: torch.Tensor  # max |ratio - 1| over real tokens


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_value: float,
    token_weight: torch.Tensor | float = 1.0,
) -> LossParts:
    """Token-level clipped losses.

    The losses are *sums* over masked tokens times ``token_weight`` so that micro-batches can
    accumulate gradients exactly: pass ``token_weight = 1 / tokens_in_mini_batch``.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = (torch.maximum(unclipped, clipped) * mask).sum() * token_weight

    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    value_error = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
    value_loss = 0.5 * (value_error * mask).sum() * token_weight

    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
        value_clip_fraction = masked_mean(((values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask)
        ratio_max_dev = ((ratio - 1.0).abs() * mask).max() if mask.numel() else ratio.new_zeros(())
    return LossParts(policy_loss, value_loss, clip_fraction, approx_kl, value_clip_fraction, ratio_max_dev)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)
