"""PolicyWithValue: shared trunk, KV-cached decoding, reference policy, trainable state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from so8t.model.policy import PolicyOutput, build_policy

# PEFT 0.21 calls a transformers API that 5.x deprecated; third-party noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SO8 = SimpleNamespace(kind="so8", layers=None, init_std=0.0)
LORA = SimpleNamespace(kind="lora", r=4, alpha=8.0, dropout=0.0,
                       target_modules=["qkv_proj", "o_proj", "lm_head"])


def tiny_model(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.Phi3Config(
        vocab_size=20, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )
    return transformers.Phi3ForCausalLM(config).eval()


def batch():
    """Left-padded prompts (row 0 has two pads) followed by three response tokens."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 12, 13, 14], [3, 4, 5, 9, 10, 11, 15, 16, 17]])
    mask = (ids != 0).long()
    return ids, mask


def base_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def randomize(policy, std: float = 0.3) -> None:
    """Move the adapters and value head away from their (identity / zero) init."""
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0.0, std)


@pytest.fixture(params=["so8", "lora"])
def kind(request):
    return request.param


def make_policy(kind: str, seed: int = 0):
    model = tiny_model(seed)
    ids, mask = batch()
    reference_logits = base_logits(model, ids, mask)
    policy = build_policy(model, SO8 if kind == "so8" else LORA)
    return policy, reference_logits


def test_values_shape_and_zero_init(kind):
    policy, _ = make_policy(kind)
    ids, mask = batch()
    out = policy(ids, mask)
    assert isinstance(out, PolicyOutput)
    assert out.logits.shape == (2, 9, 20)
    assert out.values.shape == (2, 9) and out.values.dtype == torch.float32
    assert torch.equal(out.values, torch.zeros(2, 9))
    assert out.past_key_values is None


def test_adapters_at_init_and_reference_equal_the_base(kind):
    policy, reference_logits = make_policy(kind)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(policy(ids, mask).logits, reference_logits)
        randomize(policy)
        assert not torch.allclose(policy(ids, mask).logits, reference_logits, atol=1e-3)
        with policy.reference():
            assert torch.equal(policy(ids, mask).logits, reference_logits)
        assert not torch.allclose(policy(ids, mask).logits, reference_logits, atol=1e-3)


def test_cached_incremental_decoding_matches_full_forward(kind):
    policy, _ = make_policy(kind)
    randomize(policy)
    ids, mask = batch()
    prompt_len = 6
    with torch.no_grad():
        full = policy(ids, mask)
        out = policy(ids[:, :prompt_len], mask[:, :prompt_len], use_cache=True)
        logits, values = [out.logits], [out.values]
        for t in range(prompt_len, ids.shape[1]):
            # One new token; the mask covers everything so far; positions come from it.
            out = policy(ids[:, t:t + 1], mask[:, :t + 1],
                         past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
            values.append(out.values)
    real = mask.bool()  # pad positions carry no meaning
    torch.testing.assert_close(torch.cat(logits, 1)[real], full.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(values, 1)[real], full.values[real], atol=1e-5, rtol=0)


def test_trainable_state_dict_only_holds_trainable_tensors_and_round_trips(kind):
    policy, _ = make_policy(kind)
    randomize(policy)
    state = policy.trainable_state_dict()
    assert state and all(k.startswith(("adapter.", "value_head.")) for k in state)
    trainable = {p.data_ptr() for p in policy.trainable_parameters()}
    assert {t.data_ptr() for t in state.values()} == trainable
    assert sum(t.numel() for t in state.values()) < 20_000  # the base alone is ~80 k

    ids, mask = batch()
    other, _ = make_policy(kind, seed=0)
    other.load_trainable_state_dict({k: v.clone() for k, v in state.items()})
    with torch.no_grad():
        a, b = policy(ids, mask), other(ids, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.values, b.values)

    with pytest.raises(KeyError):
        other.load_trainable_state_dict({**state, "base.lm_head.weight": torch.zeros(20, 64)})
    missing = dict(state)
    missing.pop(next(k for k in state if k.startswith("adapter.")))
    with pytest.raises((KeyError, RuntimeError)):
        other.load_trainable_state_dict(missing)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_adapters_and_value_head_only(kind, checkpointing):
    policy, _ = make_policy(kind)
    randomize(policy, std=0.05)
    if checkpointing:
        assert policy.enable_gradient_checkpointing()
        policy.train()  # HF only checkpoints in train mode (tiny model: no dropout)
    ids, mask = batch()
    out = policy(ids, mask)
    (out.logits.float().logsumexp(-1).mean() + out.values.pow(2).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    for name, p in policy.base.named_parameters():
        if id(p) not in trainable:
            assert not p.requires_grad and p.grad is None, name


def test_gradient_checkpointing_is_on_and_gives_the_same_gradients():
    grads, layer_calls = [], []
    for checkpointing in (False, True):
        policy, _ = make_policy("so8")
        randomize(policy, std=0.05)
        if checkpointing:
            assert policy.enable_gradient_checkpointing()
        policy.train()
        # A checkpointed layer runs its forward a second time in the backward pass, to rebuild
        # the activations it did not keep: that is what makes checkpointing save memory. (Counted
        # on each layer's MLP: transformers checkpoints a layer's forward, not its hooks.)
        calls = []
        handles = [layer.mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
                   for layer in policy.base.model.layers]
        ids, mask = batch()
        out = policy(ids, mask)
        (out.logits.logsumexp(-1).mean() + out.values.mean()).backward()
        for handle in handles:
            handle.remove()
        layer_calls.append(len(calls))
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    layers = len(policy.base.model.layers)
    assert layer_calls == [layers, 2 * layers]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lora_targets_lm_head_and_saves_no_base_weights():
    policy, _ = make_policy("lora")
    keys = list(policy.trainable_state_dict())
    assert any("lm_head.lora_A" in k for k in keys) and any("lm_head.lora_B" in k for k in keys)
    assert not any("base_layer" in k for k in keys)
    policy.set_gate(0.3)  # a documented no-op for LoRA


def test_so8_gate_and_unknown_adapter_kind():
    policy, reference_logits = make_policy("so8")
    randomize(policy)
    ids, mask = batch()
    policy.set_gate(0.0)
    with torch.no_grad():
        assert torch.equal(policy(ids, mask).logits, reference_logits)
    with pytest.raises(ValueError, match="adapter kind"):
        build_policy(tiny_model(), SimpleNamespace(kind="prefix"))
