"""PPO pieces: GAE, per-token rewards, KL/ratio at the start, EOS masking, optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch

from so8t.build import build_components
from so8t.ppo.advantages import gae, last_token_index, masked_whiten, token_rewards
from so8t.ppo.kl import AdaptiveKLController, FixedKLController
from so8t.ppo.rollout import response_logits, token_logprobs
from tests.conftest import typed_config


def _trainer(*overrides):
    return build_components(typed_config(["hardware.num_threads=1", *overrides])).trainer


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t=2: 1 - 0.3 = 0.7; t=1: (0.3 - 0.4) + 0.95 * 0.7 = 0.565; t=0: (0.4 - 0.5) + 0.95 * 0.565
    expected = torch.tensor([[-0.1 + 0.95 * 0.565, 0.565, 0.7]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, expected + values, atol=1e-6)


def test_gae_stops_at_the_end_of_the_episode():
    rewards = torch.tensor([[0.0, 2.0, 5.0]])  # the 5 sits after the episode: it must not count
    values = torch.tensor([[1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # t=1: 2 + 0.9 * 0 - 1 = 1; t=0: 0 + 0.9 * 1 - 1 + 0.9 * 0.95 * 1
    assert torch.allclose(advantages, torch.tensor([[-0.1 + 0.855, 1.0, 0.0]]), atol=1e-6)
    assert returns[0, 2] == 0


def test_score_lands_on_the_last_real_token_and_kl_on_every_token():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    logprobs = torch.full((2, 4), -1.0)
    ref = torch.full((2, 4), -1.5)
    rewards, kl = token_rewards(torch.tensor([3.0, -2.0]), logprobs, ref, mask, kl_coef=0.1)
    assert last_token_index(mask).tolist() == [1, 3]
    assert torch.allclose(kl, 0.5 * mask)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.05 + 3.0, 0.0, 0.0], [-0.05, -0.05, -0.05, -0.05 - 2.0]]))


def test_whitening_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    real = whitened[mask.bool()]
    assert abs(float(real.mean())) < 1e-6 and abs(float(real.std()) - 1.0) < 1e-3
    assert whitened[0, 2] == 0 and whitened[1, 2] == 0


def _whiten_as_ranks(values: torch.Tensor, mask: torch.Tensor, shares: list[slice]) -> list[torch.Tensor]:
    """Each rank's whitened share, every rank's moments handed over as the group's gather would."""
    rows: list[torch.Tensor] = []

    def gather(row: torch.Tensor) -> torch.Tensor:  # the group's all-gather, in rank order
        return torch.cat(rows)

    for share in shares:  # first pass: every rank's row, as the collective would collect them
        masked_whiten(values[share], mask[share], gather=lambda row: rows.append(row) or row)
    return [masked_whiten(values[share], mask[share], gather=gather) for share in shares]


@pytest.mark.parametrize("shares", [
    [slice(0, 3), slice(3, 6)],  # two ranks, tokens on both
    [slice(0, 2), slice(2, 6)],  # one rank's rows are all padding
    [slice(0, 1), slice(1, 4), slice(4, 6)],  # three ranks, uneven
], ids=["even", "one-rank-empty", "three-ranks"])
def test_whitening_over_ranks_equals_whitening_the_whole_batch(shares):
    torch.manual_seed(3)
    values = torch.randn(6, 5) * 4 + 7  # a mean far from 0: the combination must not cancel
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[0:2] = 0  # rows 0-1 have no tokens
    whole = masked_whiten(values, mask)
    parts = _whiten_as_ranks(values, mask, shares)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5, rtol=0)


def test_whitening_over_ranks_with_no_tokens_anywhere_gives_zeros_not_nan():
    values, mask = torch.randn(4, 3), torch.zeros(4, 3)
    parts = _whiten_as_ranks(values, mask, [slice(0, 2), slice(2, 4)])
    assert all(torch.equal(part, torch.zeros(2, 3)) for part in parts)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 32)
    assert fixed.value == 0.05
    adaptive = AdaptiveKLController(0.05, target=1.0, horizon=100)
    adaptive.update(5.0, 32)  # KL above target: beta grows (error clipped at +0.2)
    assert math.isclose(adaptive.value, 0.05 * (1 + 0.2 * 32 / 100))
    state = adaptive.state_dict()
    other = AdaptiveKLController(0.5, target=1.0, horizon=100)
    other.load_state_dict(state)
    assert other.value == adaptive.value


@pytest.fixture(scope="module")
def first_rollout():
    torch.manual_seed(0)
    trainer = _trainer()
    return trainer, trainer.make_rollout()


def test_kl_is_zero_and_ratio_is_one_on_the_first_mini_batch(first_rollout):
    trainer, scored = first_rollout
    ro = scored.rollout
    # Adapters start at the identity, so the policy is the reference.
    assert scored.stats["kl/mean"] == pytest.approx(0.0, abs=1e-5)
    rows = torch.arange(trainer.cfg.mini_batch_size)
    with torch.no_grad():
        logits, values, tokens = response_logits(trainer.policy, ro, rows)
        logprobs, _ = token_logprobs(logits, tokens, trainer.cfg.temperature, trainer.pad_id)
    mask = ro.response_mask[rows].bool()
    ratio = torch.exp(logprobs - ro.logprobs[rows])[mask]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    # The values of the sampling pass are the values of a full pass.
    assert torch.allclose(values[mask], ro.values[rows][mask], atol=1e-5)


def test_nothing_counts_after_the_stop_token(first_rollout):
    trainer, scored = first_rollout
    ro = scored.rollout
    stops = set(trainer.stop_ids)
    for row in range(ro.response_ids.shape[0]):
        ids, mask = ro.response_ids[row].tolist(), ro.response_mask[row].tolist()
        ends = [i for i, t in enumerate(ids) if t in stops]
        if ends:
            end = ends[0]
            assert mask == [1] * (end + 1) + [0] * (len(ids) - end - 1)  # the stop token counts
            assert all(t == trainer.pad_id for t in ids[end + 1 :])
            assert bool(ro.ended_with_stop[row])
        else:
            assert all(mask) and not bool(ro.ended_with_stop[row])
        tail = torch.tensor(mask) == 0
        for tensor in (ro.logprobs, ro.values, scored.advantages, scored.returns, scored.kl):
            assert torch.all(tensor[row][tail] == 0)
    assert bool(ro.ended_with_stop.any()), "the tiny model should finish some responses"


def test_responses_end_at_the_end_of_turn_token_and_rewards_see_stripped_text(first_rollout):
    trainer, scored = first_rollout
    ro = scored.rollout
    end = trainer.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end != trainer.tokenizer.eos_token_id and end in trainer.stop_ids
    last = ro.response_ids.gather(1, (ro.response_mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
    assert bool((last[ro.ended_with_stop] == end).all()), "the instruct model ends its turns with <|end|>"
    completions, raw = trainer._decode_responses(ro)
    finished = [i for i, e in enumerate(ro.ended_with_stop.tolist()) if e]
    assert finished
    for i in finished:
        assert raw[i].endswith("<|end|>") and completions[i] == raw[i].removesuffix("<|end|>")
        assert "<|" not in completions[i]
    assert scored.samples and set(scored.samples[0]) == {"prompt", "raw", "completion", "reward", "ended_with_stop"}
    assert scored.samples[0]["prompt"].startswith("<|system|>")


def test_special_tokens_can_be_kept_for_the_reward_terms():
    torch.manual_seed(0)
    trainer = _trainer("ppo.rollout_batch_size=8", "reward.skip_special_tokens=false")
    completions, raw = trainer._decode_responses(trainer.make_rollout().rollout)
    assert completions == raw and any(c.endswith("<|end|>") for c in completions)


def test_any_configured_stop_token_or_stop_string_ends_a_response():
    torch.manual_seed(0)
    trainer = _trainer("ppo.rollout_batch_size=16")
    final = trainer.tokenizer.convert_tokens_to_ids("<final>")
    torch.manual_seed(0)
    extra = _trainer("ppo.rollout_batch_size=16", f"ppo.stop_token_ids=[{final}]")
    ro = extra.make_rollout().rollout
    ids = ro.response_ids.tolist()
    for row, mask in enumerate(ro.response_mask.tolist()):
        if final in ids[row]:
            assert sum(mask) == ids[row].index(final) + 1 and bool(ro.ended_with_stop[row])
    assert any(final in row for row in ids)
    torch.manual_seed(0)
    by_string = _trainer("ppo.rollout_batch_size=16", "ppo.stop_strings=['<final>']")
    ro = by_string.make_rollout().rollout
    completions, _ = by_string._decode_responses(ro)
    assert all(c.endswith("<final>") for c, e in zip(completions, ro.ended_with_stop.tolist()) if e)
    assert bool(ro.ended_with_stop.any())


def indexed_reward(completions, **kwargs):
    """A reward term whose values are known in advance: 0.1 × the episode's index."""
    return [0.1 * i for i in range(len(completions))]


def test_missing_stop_is_penalised_and_score_is_the_weighted_reward():
    torch.manual_seed(0)
    # Short responses, so that some hit max_new_tokens without a stop.
    trainer = _trainer("~reward.terms.format", "~reward.terms.exact_match", "ppo.max_new_tokens=3",
                       "ppo.missing_eos_penalty=0.3",
                       "+reward.terms.indexed={_target_:tests.test_ppo.indexed_reward,_partial_:true,weight:0.5}")
    scored = trainer.make_rollout()
    ended = scored.rollout.ended_with_stop.tolist()
    assert not all(ended), "the case needs episodes that hit max_new_tokens"
    expected = [0.5 * 0.1 * i - (0.0 if stop else 0.3) for i, stop in enumerate(ended)]
    assert scored.scores.tolist() == pytest.approx(expected, abs=1e-6)
    # reward/mean is the weighted reward before the missing-stop penalty.
    n = len(ended)
    assert scored.stats["reward/mean"] == pytest.approx(sum(0.05 * i for i in range(n)) / n, abs=1e-6)


@pytest.mark.parametrize("layers", ["null", "[-1]"])  # [-1]: the PPO forwards start from a frozen prefix
@pytest.mark.parametrize("recompute", [True, False])
def test_bf16_ratio_is_exactly_one_at_the_start_only_with_recompute(recompute, layers):
    torch.manual_seed(0)
    trainer = _trainer("hardware.dtype=bfloat16", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8",
                       "hardware.micro_batch_size=4", "ppo.max_new_tokens=12",
                       f"ppo.recompute_old_logprobs={recompute}", f"adapter.layers={layers}",
                       "hardware.rollout_micro_batch_size=8")
    row = trainer.train_step()
    if recompute:
        # Old log-probs from the very forward the first mini-batch trains with: ratio 1, KL 0.
        assert row["ppo/ratio_max_dev_start"] == 0.0 and row["ppo/approx_kl_start"] == 0.0
        assert row["kl/mean"] == 0.0  # the reference pass uses the same grouping
        assert "time/recompute" in row
    else:
        # KV-cached decoding and a full forward round differently in bf16.
        assert row["ppo/ratio_max_dev_start"] > 1e-3 and row["ppo/approx_kl_start"] > 0.0


def test_recompute_defaults_to_on_below_fp32_only():
    assert _trainer("hardware.dtype=bfloat16").recompute_old_logprobs
    assert not _trainer().recompute_old_logprobs
    assert _trainer("ppo.recompute_old_logprobs=true").recompute_old_logprobs


def test_dropout_is_off_in_ppo_forwards_while_gradient_checkpointing_works():
    from types import SimpleNamespace

    from transformers import Phi3ForCausalLM

    from so8t.model.policy import build_policy
    from so8t.model.tiny import build_tiny_config, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer=tok)
    config.resid_pdrop = config.embd_pdrop = config.attention_dropout = 0.5
    ids = torch.randint(8, len(tok), (2, 9))
    mask = torch.ones_like(ids)

    def policy_and_saved_tensors(checkpointing: bool):
        torch.manual_seed(0)
        policy = build_policy(Phi3ForCausalLM(config), SimpleNamespace(kind="so8", layers=[0], init_std=0.1))
        if checkpointing:
            assert policy.enable_gradient_checkpointing()
        policy.train_without_dropout()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            first = policy(ids, mask)
        second = policy(ids, mask)
        assert torch.equal(first.logits, second.logits) and torch.equal(first.values, second.values)
        first.values.sum().backward()
        assert policy.adapter.rotations["0"].skew.grad is not None
        return policy, len(saved)

    _, kept = policy_and_saved_tensors(False)
    policy, checkpointed = policy_and_saved_tensors(True)
    # Checkpointed layers keep only their inputs for the backward pass, not their activations.
    assert checkpointed < kept / 2, (checkpointed, kept)
    policy.train()  # plain training mode: dropout on, the forwards differ
    assert not torch.equal(policy(ids, mask).logits, policy(ids, mask).logits)


def test_fp16_trains_with_loss_scaling_and_checkpoints_the_scaler():
    torch.manual_seed(0)
    trainer = _trainer("hardware.dtype=float16", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                       "ppo.ppo_epochs=1")
    assert "grad_scaler" in trainer.stateful_parts()
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    row = trainer.train_step()
    assert row["optim/loss_scale"] > 1.0
    after = trainer.policy.trainable_state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize("micro", [None, 2])
def test_one_optimizer_step_per_mini_batch_per_epoch(micro):
    overrides = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=4", "ppo.ppo_epochs=3"]
    if micro:
        overrides.append(f"hardware.micro_batch_size={micro}")
    trainer = _trainer(*overrides)
    steps = []
    handle = trainer.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    row = trainer.train_step()
    handle.remove()
    assert len(steps) == 3 * (16 // 4)
    assert row["step"] == 1 and row["count/episodes"] == 16


def test_micro_batches_accumulate_to_the_mini_batch_gradient():
    torch.manual_seed(0)
    trainer = _trainer("ppo.rollout_batch_size=8", "ppo.mini_batch_size=8")
    scored = trainer.make_rollout()
    rows = torch.arange(8)
    tokens = float(scored.rollout.response_mask.sum())
    params = trainer.policy.trainable_parameters()

    def grads(chunks):
        for p in params:
            p.grad = None
        for chunk in chunks:
            loss, *_ = trainer._micro_batch_loss(scored, chunk, 1.0 / tokens)
            loss.backward()
        return [p.grad.clone() for p in params]

    whole = grads([rows])
    split = grads([rows[:3], rows[3:5], rows[5:]])
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_update_moves_only_the_trainable_parameters():
    trainer = _trainer("ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1")
    base_before = {k: v.clone() for k, v in trainer.policy.base.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    trainer.train_step()
    for k, v in trainer.policy.base.state_dict().items():
        if "rotations" not in k:
            assert torch.equal(v, base_before[k]), k
    after = trainer.policy.trainable_state_dict()
    assert any(not torch.equal(after[k], trainable_before[k]) for k in after)


def test_reward_normalisation_is_applied_before_the_stop_penalty_and_checkpointed():
    def first_scores(*overrides):
        torch.manual_seed(0)
        trainer = _trainer("ppo.rollout_batch_size=16", *overrides)
        scored = trainer.make_rollout()
        ended = scored.rollout.ended_with_stop
        return trainer, scored, scored.scores + trainer.cfg.missing_eos_penalty * (~ended).float()

    trainer, scored, total = first_scores("reward.normalize=true")
    normalizer = trainer.stateful_parts()["reward_normalizer"]
    # After the first batch the running statistics are that batch's: normalised to mean 0, std 1.
    assert normalizer.count == 16 and set(normalizer.state_dict()) == {"count", "mean", "m2"}
    assert float(total.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(total.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert scored.stats["reward/mean"] != pytest.approx(0.0, abs=1e-3)  # the logged reward is the raw one
    _, _, clipped = first_scores("reward.normalize=true", "reward.clip=0.5")
    assert float(clipped.abs().max()) == pytest.approx(0.5)
    _, plain, raw = first_scores()
    assert float(raw.mean()) == pytest.approx(plain.stats["reward/mean"], abs=1e-6)  # off: untouched
