"""The shortcuts the PPO loop takes for speed give the same numbers as the long way."""

from __future__ import annotations

import pytest
import torch

from so8t.ppo.rollout import sample_responses
from tests.test_policy import batch, make_policy, randomize

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize("kind", ["so8", "lora"])
def test_frozen_adapters_give_bit_identical_forwards(kind):
    policy, _ = make_policy(kind)
    randomize(policy)
    ids, mask = batch()
    with torch.no_grad():
        plain = policy(ids, mask)
        with policy.frozen_adapters():
            frozen = policy(ids, mask)
            with policy.reference():  # switching the adapters off still works inside
                reference = policy(ids, mask)
        after = policy(ids, mask)
        with policy.reference():
            reference_plain = policy(ids, mask)
    assert torch.equal(plain.logits, frozen.logits) and torch.equal(plain.values, frozen.values)
    assert torch.equal(reference.logits, reference_plain.logits)
    assert torch.equal(plain.logits, after.logits)


def test_frozen_so8_cache_is_ignored_with_gradients_and_cleared_after():
    policy, _ = make_policy("so8")
    randomize(policy)
    ids, mask = batch()
    with policy.frozen_adapters():
        out = policy(ids, mask)  # grad mode: computed afresh, so gradients reach the rotations
        out.logits.sum().backward()
    assert all(p.grad is not None for p in policy.adapter.parameters())
    assert all(r._frozen_delta is None for r in policy.adapter.rotations.values())


@pytest.mark.parametrize("kind", ["so8", "lora"])
def test_output_slice_matches_slicing_the_full_output(kind):
    policy, _ = make_policy(kind)
    randomize(policy)
    ids, mask = batch()
    with torch.no_grad():
        full = policy(ids, mask)
        part = policy(ids, mask, output_slice=slice(5, 8))
    assert part.logits.shape == (2, 3, full.logits.shape[-1])
    torch.testing.assert_close(part.logits, full.logits[:, 5:8], rtol=0, atol=1e-6)
    torch.testing.assert_close(part.values, full.values[:, 5:8], rtol=0, atol=1e-6)


def test_sampling_with_frozen_adapters_is_the_same_rollout():
    policy, _ = make_policy("so8")
    randomize(policy, std=0.1)
    ids, mask = batch()
    query_ids, query_mask = ids[:, :6], mask[:, :6]
    torch.manual_seed(3)
    plain = sample_responses(policy, query_ids, query_mask, 6, 1.0, stop_ids=[1], pad_id=0)
    torch.manual_seed(3)
    with policy.frozen_adapters():
        frozen = sample_responses(policy, query_ids, query_mask, 6, 1.0, stop_ids=[1], pad_id=0)
    assert torch.equal(plain.response_ids, frozen.response_ids)
    assert torch.equal(plain.logprobs, frozen.logprobs) and torch.equal(plain.values, frozen.values)

