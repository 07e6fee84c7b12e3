"""Chunked passes and frozen-prefix reuse give the numbers of one whole-batch, full pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from so8t.model.policy import build_policy
from so8t.ppo.passes import response_logprobs, rollout_prefix, row_chunks, sample_in_chunks
from so8t.ppo.rollout import response_logits, sample_responses
from tests.test_policy import batch, randomize
from tests.test_ppo import _trainer

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TOL = dict(rtol=0, atol=1e-6)


def four_layer_policy(adapter):
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=20, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )
    policy = build_policy(transformers.Phi3ForCausalLM(config).eval(), adapter)
    randomize(policy, std=0.1)
    return policy


SO8_TOP = SimpleNamespace(kind="so8", layers=[2, 3], init_std=0.0)
LORA_HEAD = SimpleNamespace(kind="lora", r=4, alpha=8.0, dropout=0.0, target_modules=["lm_head"])
LORA_ALL = SimpleNamespace(kind="lora", r=4, alpha=8.0, dropout=0.0, target_modules=["qkv_proj", "o_proj"])


def test_first_adapted_layer_is_found_for_each_adapter():
    assert four_layer_policy(SO8_TOP).first_adapted_layer == 2
    assert four_layer_policy(LORA_HEAD).first_adapted_layer == 4  # every decoder layer is frozen
    assert four_layer_policy(LORA_ALL).first_adapted_layer == 0
    ids, mask = batch()
    assert four_layer_policy(LORA_ALL).frozen_prefix(ids, mask) is None


@pytest.mark.parametrize("adapter", [SO8_TOP, LORA_HEAD], ids=["so8-last-two", "lora-lm-head"])
def test_prefix_reuse_gives_the_full_pass_logits_values_and_gradients(adapter):
    policy = four_layer_policy(adapter)
    ids, mask = batch()
    prefix = policy.frozen_prefix(ids, mask)
    assert prefix.shape == (2, ids.shape[1], 64) and not prefix.requires_grad

    full = policy(ids, mask, output_slice=slice(5, 9))
    reused = policy(ids, mask, output_slice=slice(5, 9), prefix=prefix)
    torch.testing.assert_close(reused.logits, full.logits, **TOL)
    torch.testing.assert_close(reused.values, full.values, **TOL)

    def grads(out):
        policy.zero_grad(set_to_none=True)
        (out.logits.square().mean() + out.values.sum()).backward()
        return [p.grad.clone() for p in policy.trainable_parameters()]

    for a, b in zip(grads(policy(ids, mask, prefix=prefix)), grads(policy(ids, mask))):
        torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad(), policy.reference():  # the reference pass shares the prefix
        torch.testing.assert_close(policy(ids, mask, prefix=prefix).logits, policy(ids, mask).logits, **TOL)
    # Back to the class's forward: later calls without a prefix are full passes again.
    assert all("forward" not in vars(layer) for layer in policy.base.model.layers)


def test_a_prefix_of_other_rows_is_refused():
    policy = four_layer_policy(SO8_TOP)
    ids, mask = batch()
    prefix = policy.frozen_prefix(ids, mask)
    with pytest.raises(ValueError, match="frozen prefix"):
        policy(ids[:1], mask[:1], prefix=prefix)


def _rollout(policy, chunk, greedy=False):
    ids, mask = batch()
    query_ids, query_mask = ids[:, :6], mask[:, :6]
    torch.manual_seed(5)
    uniforms = torch.rand(2, 8)
    return sample_in_chunks(
        lambda q, m, rows: sample_responses(policy, q, m, 8, 1.0, stop_ids=[1], pad_id=0, greedy=greedy,
                                            uniforms=uniforms[rows]),
        query_ids, query_mask, chunk, pad_id=0)


def test_row_chunks():
    assert row_chunks(5, None) == [slice(0, 5)]
    assert row_chunks(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


@pytest.mark.parametrize("greedy", [False, True])
def test_chunked_sampling_gives_the_whole_batch_rollout(greedy):
    policy = four_layer_policy(SO8_TOP)
    with torch.no_grad():
        whole, chunked = _rollout(policy, None, greedy), _rollout(policy, 1, greedy)
    assert torch.equal(whole.response_ids, chunked.response_ids)
    assert torch.equal(whole.response_mask, chunked.response_mask)
    assert torch.equal(whole.ended_with_stop, chunked.ended_with_stop)
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, **TOL)
    torch.testing.assert_close(chunked.values, whole.values, **TOL)


def test_chunked_reference_and_prefix_give_the_whole_batch_log_probs():
    policy = four_layer_policy(SO8_TOP)
    with torch.no_grad():
        rollout = _rollout(policy, None)
        logits, values, tokens = response_logits(policy, rollout)
    whole, whole_values = response_logprobs(policy, rollout, 1.0, 0, None)
    for chunk in (1, 2):
        prefix = rollout_prefix(policy, rollout, chunk)
        for use_prefix in (None, prefix):
            got, got_values = response_logprobs(policy, rollout, 1.0, 0, chunk, use_prefix)
            torch.testing.assert_close(got, whole, **TOL)
            torch.testing.assert_close(got_values, whole_values, **TOL)
    torch.testing.assert_close(whole_values, values * rollout.response_mask, **TOL)


def _one_update(*overrides):
    torch.manual_seed(0)
    trainer = _trainer("adapter.layers=[-1]", "adapter.init_std=0.05", "ppo.rollout_batch_size=8",
                       "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", *overrides)
    rows = [trainer.train_step() for _ in range(2)]
    return rows, {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}


def test_an_update_is_the_same_with_or_without_prefix_reuse_and_chunking():
    base_rows, base_state = _one_update("hardware.frozen_prefix_reuse=false")
    for overrides in (["hardware.frozen_prefix_reuse=true"],
                      ["hardware.frozen_prefix_reuse=true", "hardware.rollout_micro_batch_size=3"]):
        rows, state = _one_update(*overrides)
        for row, base in zip(rows, base_rows):
            for key, value in base.items():
                if key.startswith("time/"):
                    continue
                # The start-of-update ratio figures measure float rounding between two passes
                # (about 1e-5 in fp32), which the order of additions may move within itself.
                tolerance = 1e-4 if key in ("ppo/ratio_max_dev_start", "ppo/approx_kl_start") else 1e-6
                assert row[key] == pytest.approx(value, abs=tolerance), (overrides, key)
            assert {"time/sampling", "time/reference", "time/ppo"} <= set(row)
        for key, value in base_state.items():
            torch.testing.assert_close(state[key], value, **TOL)


def test_prefix_reuse_with_gradient_checkpointing_in_train_mode():
    policy = four_layer_policy(SO8_TOP)
    assert policy.enable_gradient_checkpointing()
    policy.train()
    ids, mask = batch()
    prefix = policy.frozen_prefix(ids, mask)

    def grads(**kwargs):
        policy.zero_grad(set_to_none=True)
        out = policy(ids, mask, **kwargs)
        (out.logits.square().mean() + out.values.sum()).backward()
        return out.logits.detach(), [p.grad.clone() for p in policy.trainable_parameters()]

    (full_logits, full_grads), (logits, reused_grads) = grads(), grads(prefix=prefix)
    torch.testing.assert_close(logits, full_logits, **TOL)
    for a, b in zip(reused_grads, full_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_inverse_cdf_sampling_follows_the_distribution_and_never_picks_a_zero():
    from so8t.ppo.rollout import inverse_cdf_sample

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    uniforms = torch.rand(40000, generator=generator)
    tokens = inverse_cdf_sample(probs.expand(40000, -1), uniforms)
    counts = torch.bincount(tokens, minlength=6).float() / 40000
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts, probs, rtol=0, atol=0.01)
    # The extremes of [0, 1): the first and the last token of positive probability.
    edges = inverse_cdf_sample(probs.expand(2, -1), torch.tensor([0.0, 1.0 - 2**-24]))
    assert edges.tolist() == [1, 4]


def test_the_reference_pass_records_the_frozen_prefix_bit_for_bit():
    from so8t.ppo.passes import reference_logprobs

    policy = four_layer_policy(SO8_TOP)
    with torch.no_grad():
        rollout = _rollout(policy, None)
    for chunk in (None, 1):
        logprobs, prefix = reference_logprobs(policy, rollout, 1.0, 0, chunk, keep_prefix=True)
        assert torch.equal(prefix, rollout_prefix(policy, rollout, chunk))
        plain, none = reference_logprobs(policy, rollout, 1.0, 0, chunk, keep_prefix=False)
        assert none is None and torch.equal(plain, logprobs)
    assert reference_logprobs(four_layer_policy(LORA_ALL), rollout, 1.0, 0, None, keep_prefix=True)[1] is None
