"""SO(8) residual rotation adapters and the gate schedule."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn

from so8t.model.gate import GateSchedule
from so8t.model.so8 import So8Adapters, So8Rotation, attach_so8_adapters


def tiny_model(seed: int = 0, hidden_size: int = 64) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.Phi3Config(
        vocab_size=20, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )
    # Frozen from the start, as the trainer's base is: HF generate() takes a slightly
    # different numeric path (1 ulp) when parameters require grad, which would spoil the
    # bit-exact comparisons below for reasons unrelated to the adapters.
    return transformers.Phi3ForCausalLM(config).eval().requires_grad_(False)


def batch():
    """Two left-padded rows, positions built from the mask (as the trainer does)."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 9, 10, 11]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def logits_of(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def randomize(adapters: So8Adapters, std: float = 0.5) -> None:
    with torch.no_grad():
        for p in adapters.trainable_parameters():
            p.normal_(0.0, std)


def greedy(model, ids, mask):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
        pad_token_id=0, eos_token_id=1, output_scores=True, return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.scores)


# ------------------------------------------------------------------ So8Rotation


@pytest.mark.parametrize("init_std", [0.0, 0.7])
def test_every_block_rotation_is_in_so8(init_std):
    torch.manual_seed(1)
    rotation = So8Rotation(32, init_std=init_std)
    r = rotation.rotation()
    assert r.shape == (4, 8, 8)
    eye = torch.eye(8).expand(4, 8, 8)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(4), atol=1e-5, rtol=0)
    a = rotation.generator()
    assert torch.equal(a, -a.transpose(-1, -2))  # skew-symmetric by construction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_generator_is_bit_exact_identity(dtype):
    rotation = So8Rotation(16)
    h = torch.randn(2, 3, 16).to(dtype)
    out = rotation(h, gate=1.0)
    assert out.dtype == dtype
    assert torch.equal(out, h)
    assert rotation.skew.dtype == torch.float32


def test_forward_is_blockwise_gated_rotation():
    torch.manual_seed(2)
    rotation = So8Rotation(16, init_std=0.3)
    h = torch.randn(5, 16)
    gate = 0.25
    r = rotation.rotation()
    expected = torch.cat(
        [h[:, 8 * b: 8 * b + 8] + gate * (h[:, 8 * b: 8 * b + 8] @ r[b].T - h[:, 8 * b: 8 * b + 8])
         for b in range(2)],
        dim=-1,
    )
    torch.testing.assert_close(rotation(h, gate), expected, atol=1e-6, rtol=1e-6)
    # gate 1 is a pure rotation: norms of each block are preserved
    out = rotation(h, 1.0).view(5, 2, 8)
    torch.testing.assert_close(out.norm(dim=-1), h.view(5, 2, 8).norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_hidden_size_not_multiple_of_8_is_refused():
    with pytest.raises(ValueError, match="hidden_size=60"):
        So8Rotation(60)
    with pytest.raises(ValueError, match="60"):
        attach_so8_adapters(tiny_model(hidden_size=60), None, 0.0)


# ------------------------------------------------------------- attached adapters


def test_adapters_at_init_are_exactly_the_base_model():
    model = tiny_model()
    ids, mask, positions = batch()
    base_logits = logits_of(model, ids, mask, positions)
    adapters = attach_so8_adapters(model, None, 0.0)
    assert adapters.layer_indices == [0, 1]
    assert torch.equal(logits_of(model, ids, mask, positions), base_logits)


def test_rotations_change_logits_and_generate_and_disabled_is_base():
    model = tiny_model()
    ids, mask, positions = batch()
    base_logits = logits_of(model, ids, mask, positions)
    base_seq, base_scores = greedy(model, ids, mask)

    adapters = attach_so8_adapters(model, [-1], 0.0)  # after the last layer only
    randomize(adapters)
    assert not torch.allclose(logits_of(model, ids, mask, positions), base_logits, atol=1e-3)
    seq, scores = greedy(model, ids, mask)
    assert not torch.allclose(scores, base_scores, atol=1e-3)

    with adapters.disabled():
        assert not adapters.enabled
        assert torch.equal(logits_of(model, ids, mask, positions), base_logits)
        off_seq, off_scores = greedy(model, ids, mask)
        assert torch.equal(off_seq, base_seq) and torch.equal(off_scores, base_scores)
    assert adapters.enabled

    adapters.set_gate(0.0)  # a closed gate is the base model too
    assert torch.equal(logits_of(model, ids, mask, positions), base_logits)

    adapters.remove()
    adapters.set_gate(1.0)
    assert torch.equal(logits_of(model, ids, mask, positions), base_logits)


def test_init_std_gives_nonzero_rotations_and_base_is_frozen():
    model = tiny_model()
    adapters = attach_so8_adapters(model, None, 0.1)
    params = adapters.trainable_parameters()
    assert len(params) == 2 and all(p.shape == (8, 28) and p.abs().sum() > 0 for p in params)
    assert not any(p.requires_grad for p in model.parameters())
    assert set(adapters.state_dict()) == {"rotations.0.skew", "rotations.1.skew"}


def test_state_dict_round_trip():
    source = attach_so8_adapters(tiny_model(), [0], 0.2)
    target = attach_so8_adapters(tiny_model(), [0], 0.0)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.rotations["0"].skew, source.rotations["0"].skew)
    with pytest.raises(RuntimeError):  # another layer selection is a different adapter shape
        attach_so8_adapters(tiny_model(), [1], 0.0).load_state_dict(source.state_dict())


@pytest.mark.parametrize("layers", [[2], [-3], [0, 5]])
def test_out_of_range_layer_index_is_refused(layers):
    bad = [i for i in layers if not -2 <= i < 2][0]
    with pytest.raises(ValueError, match=rf"layer index {bad} .* 2 layers"):
        attach_so8_adapters(tiny_model(), layers, 0.0)


def test_negative_layer_index_counts_from_the_end():
    assert attach_so8_adapters(tiny_model(), [-1], 0.0).layer_indices == [1]
    with pytest.raises(ValueError, match="same layer twice"):
        attach_so8_adapters(tiny_model(), [1, -1], 0.0)


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="decoder layers"):
        attach_so8_adapters(nn.Linear(8, 8), None, 0.0)


def test_hook_handles_tuple_layer_outputs():
    """Older transformers decoder layers return (hidden_states, *extras)."""

    class TupleLayer(nn.Module):
        def forward(self, h):
            return h, "extra"

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([TupleLayer()])

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.config = type("Config", (), {"hidden_size": 8})()
            self.dummy = nn.Parameter(torch.zeros(1))

    outer = Outer()
    adapters = attach_so8_adapters(outer, None, 0.5)
    h = torch.randn(3, 8)
    out, extra = outer.model.layers[0](h)
    assert extra == "extra"
    torch.testing.assert_close(out, adapters.rotations["0"](h, 1.0))


# ------------------------------------------------------------------ gate schedule


def test_constant_gate_returns_target():
    schedule = GateSchedule("constant", start=0.0, target=0.7, steps=10)
    assert [schedule.value(s) for s in (0, 5, 100)] == [0.7, 0.7, 0.7]


def test_sigmoid_gate_hits_endpoints_and_is_monotonic():
    schedule = GateSchedule("sigmoid", start=0.0, target=1.0, steps=100, steepness=10.0)
    assert schedule.value(0) == 0.0
    assert schedule.value(100) == 1.0
    assert schedule.value(250) == 1.0
    assert math.isclose(schedule.value(50), 0.5, abs_tol=1e-12)
    values = [schedule.value(s) for s in range(101)]
    assert all(b > a for a, b in zip(values, values[1:]))
    down = GateSchedule("sigmoid", start=1.0, target=0.2, steps=10)
    assert down.value(0) == 1.0 and down.value(10) == 0.2 and down.value(3) > down.value(7)


def test_gate_schedule_state_round_trip_and_validation():
    schedule = GateSchedule("sigmoid", start=0.1, target=0.9, steps=20, steepness=6.0)
    schedule.value(7)
    state = schedule.state_dict()
    assert state["last_step"] == 7
    restored = GateSchedule()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.value(12) == schedule.value(12)
    with pytest.raises(ValueError, match="linear"):
        GateSchedule("linear")
