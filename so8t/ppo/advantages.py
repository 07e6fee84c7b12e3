"""Per-token rewards, GAE and masked statistics: pure tensor functions."""

from __future__ import annotations

from typing import Callable

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the masked entries (of all of them, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise to unit variance over the masked entries (and zero mean if ``shift_mean``).

    ``gather`` turns this rank's row of numbers into every rank's rows (so8t.distributed.Group
    .gather_rows): the mean and variance are then the whole group's batch, from one collective."""
    if gather is None:
        mean = masked_mean(values, mask)
        count = mask.sum().clamp(min=2)
        centred = values - mean
        # Unbiased variance, as in the PPO-for-LM reference implementations.
        var = ((centred**2) * mask).sum() / (count - 1)
    else:
        mean, var = _group_moments(values, mask.to(values.dtype), gather)
        centred = values - mean
    whitened = centred * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def _group_moments(values: torch.Tensor, mask: torch.Tensor,
                   gather: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's masked mean and unbiased variance from each rank's count, mean and sum of
    squared deviations (Chan et al.'s pairwise combination): one collective, where sums of
    squares would need a second one for the centring, or lose precision to cancellation."""
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1)
    squares = (((values - mean) ** 2) * mask).sum()
    counts, means, all_squares = gather(torch.stack([count, mean, squares]).reshape(1, 3)).unbind(1)
    total = counts.sum()
    group_mean = (counts * means).sum() / total.clamp(min=1)
    spread = all_squares.sum() + (counts * (means - group_mean) ** 2).sum()
    return group_mean, spread / (total.clamp(min=2) - 1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real response token per row (0 for an empty response)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).amax(dim=1)


def token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward: ``-beta * (log pi - log pi_ref)`` on every real token, plus the
    episode's score on its last real token. Returns (rewards, per-token KL)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (mask 1 = real token).

    Tokens after the last real one contribute nothing; the value after the last real token
    is 0 (the episode ends there). Returns (advantages, returns), both masked.
    """
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # A padded position resets the recursion so nothing leaks across the episode end.
        running = running * mask[:, t]
        advantages[:, t] = running
    returns = advantages + values
    return advantages * mask, returns * mask
