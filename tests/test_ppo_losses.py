"""ppo_losses on hand-computed cases: the clip's direction, value clipping, token weighting."""

from __future__ import annotations

import math

import pytest
import torch

from so8t.ppo.losses import ppo_losses

E_HALF = math.exp(0.5)  # ratio of a token whose log-prob rose by 0.5


def _losses(log_ratio, advantage, *, values=0.0, old_values=0.0, returns=0.0, mask=None, clip=0.2,
            clip_value=0.2, weight=1.0):
    logprobs = torch.tensor([[float(log_ratio)]], requires_grad=True)
    values_t = torch.tensor([[float(values)]], requires_grad=True)
    parts = ppo_losses(logprobs, torch.zeros(1, 1), torch.tensor([[float(advantage)]]), values_t,
                       torch.tensor([[float(old_values)]]), torch.tensor([[float(returns)]]),
                       torch.ones(1, 1) if mask is None else mask, clip, clip_value, weight)
    (parts.policy_loss + parts.value_loss).backward()
    return parts, logprobs.grad.item(), values_t.grad.item()


@pytest.mark.parametrize("log_ratio,advantage,loss,clipped", [
    # A good action made more likely beyond 1 + ε: the gain stops at 1.2 A, no gradient pushes further.
    (0.5, 1.0, -1.2, True),
    # A bad action made more likely: the full, unclipped penalty (pessimistic bound), gradient on.
    (0.5, -1.0, E_HALF, False),
    # A good action made less likely: unclipped, the gradient pulls it back up.
    (-0.5, 1.0, -math.exp(-0.5), False),
    # A bad action made less likely beyond 1 - ε: the gain stops at 0.8 |A|.
    (-0.5, -1.0, 0.8, True),
    # Inside the trust region nothing is clipped.
    (0.1, 2.0, -2.0 * math.exp(0.1), False),
])
def test_policy_loss_clips_only_in_the_direction_that_would_gain(log_ratio, advantage, loss, clipped):
    parts, grad, _ = _losses(log_ratio, advantage)
    assert parts.policy_loss.item() == pytest.approx(loss, rel=1e-6)
    if clipped:
        assert grad == 0.0
    else:  # d(-A r)/d log r = -A r
        assert grad == pytest.approx(-advantage * math.exp(log_ratio), rel=1e-6)
    assert parts.clip_fraction.item() == (1.0 if abs(math.exp(log_ratio) - 1) > 0.2 else 0.0)


def test_value_loss_takes_the_larger_error_of_the_clipped_and_unclipped_value():
    # The value ran from 0 to 1 toward a return of 2; clipped to 0.2 its error is larger: 1.8² > 1².
    parts, _, grad = _losses(0.0, 0.0, values=1.0, old_values=0.0, returns=2.0)
    assert parts.value_loss.item() == pytest.approx(0.5 * 1.8**2)
    assert grad == 0.0  # the clipped branch carries no gradient to the value
    assert parts.value_clip_fraction.item() == 1.0
    # The value ran from 0 to 1 past a return of 0: the unclipped error 1² is the larger one.
    parts, _, grad = _losses(0.0, 0.0, values=1.0, old_values=0.0, returns=0.0)
    assert parts.value_loss.item() == pytest.approx(0.5)
    assert grad == pytest.approx(1.0)  # d(0.5 (v - R)²)/dv
    assert parts.value_clip_fraction.item() == 0.0


def test_losses_are_token_sums_times_the_weight_so_micro_batches_add_up_exactly():
    torch.manual_seed(0)
    shape = (4, 6)
    logprobs, old = torch.randn(shape) * 0.3, torch.randn(shape) * 0.3
    adv, values, old_values, returns = torch.randn(shape), torch.randn(shape), torch.randn(shape), torch.randn(shape)
    mask = (torch.rand(shape) > 0.3).float()
    tokens = mask.sum()
    whole = ppo_losses(logprobs, old, adv, values, old_values, returns, mask, 0.2, 0.2, 1 / tokens)
    halves = [ppo_losses(logprobs[s], old[s], adv[s], values[s], old_values[s], returns[s], mask[s], 0.2, 0.2,
                         1 / tokens) for s in (slice(0, 2), slice(2, 4))]
    assert (halves[0].policy_loss + halves[1].policy_loss).item() == pytest.approx(whole.policy_loss.item(), abs=1e-6)
    assert (halves[0].value_loss + halves[1].value_loss).item() == pytest.approx(whole.value_loss.item(), abs=1e-6)
    # Padding never counts: changing what lies under mask == 0 changes nothing.
    noise = torch.randn(shape) * (1 - mask) * 100
    padded = ppo_losses(logprobs + noise, old, adv + noise, values + noise, old_values, returns, mask, 0.2, 0.2,
                        1 / tokens)
    assert padded.policy_loss.item() == pytest.approx(whole.policy_loss.item(), abs=1e-6)
    assert padded.value_loss.item() == pytest.approx(whole.value_loss.item(), abs=1e-6)
    # With weight 1 / tokens the policy loss is the mean over real tokens of -A r (here inside the clip).
    small = ppo_losses(old + 0.01, old, adv, values, values, returns, mask, 0.2, 0.2, 1 / tokens)
    expected = (-(adv * math.exp(0.01)) * mask).sum() / tokens
    assert small.policy_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ratio_diagnostics_ignore_padding():
    logprobs = torch.tensor([[0.1, 5.0]])
    mask = torch.tensor([[1.0, 0.0]])
    parts = ppo_losses(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                       torch.zeros(1, 2), mask, 0.2, 0.2)
    assert parts.ratio_max_dev.item() == pytest.approx(math.exp(0.1) - 1, rel=1e-6)
    assert parts.approx_kl.item() == pytest.approx(0.5 * 0.1**2, rel=1e-5)
    assert parts.clip_fraction.item() == 0.0
