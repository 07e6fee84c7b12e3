"""The exact SO(8) merge on random models built here: several adapted layers, random
non-zero rotations, random norm scales and biases, gate 1."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from so8t.export import FoldError
from so8t.export.fold import check_foldable, fold_rotations
from so8t.model.policy import build_policy

VOCAB = 40
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2,
              initializer_range=0.2)  # logits of order 1, so the 1e-4 bound below is meaningful


def _models():
    return {
        "phi3": lambda eps: Phi3ForCausalLM(Phi3Config(**COMMON, rms_norm_eps=eps)),
        # attention_bias/mlp_bias: o_proj and down_proj, the stream writers, get biases too.
        "llama": lambda eps: LlamaForCausalLM(LlamaConfig(**COMMON, rms_norm_eps=eps, attention_bias=True,
                                                          mlp_bias=True)),
        "mistral": lambda eps: MistralForCausalLM(MistralConfig(**COMMON, rms_norm_eps=eps)),
        "qwen2": lambda eps: Qwen2ForCausalLM(Qwen2Config(**COMMON, rms_norm_eps=eps)),  # q/k/v biases
    }


def _randomise(model: torch.nn.Module) -> None:
    """Norm scales far from 1 and non-zero biases, so a fold that mishandles them shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.3, 2.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)


def _adapted(model, layers=(0, 2, -1)):
    torch.manual_seed(2)
    policy = build_policy(model.eval(), OmegaConf.create({"kind": "so8", "layers": list(layers), "init_std": 0.4}))
    with torch.no_grad():
        policy.value_head.weight.normal_()
        policy.value_head.bias.fill_(0.3)
    return policy


def _forward(policy, ids, mask):
    with torch.no_grad():
        out = policy(ids, mask)
    return out.logits, out.values


@pytest.mark.parametrize("eps", [1e-5, 1.0])  # eps=1: the norm's eps term matters as much as |h|²
@pytest.mark.parametrize("arch", sorted(_models()))
def test_merged_model_has_the_adapted_logits_and_values(arch, eps):
    torch.manual_seed(0)
    model = _models()[arch](eps)
    _randomise(model)
    policy = _adapted(model)
    ids = torch.randint(3, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, :5] = 0  # a left-padded row
    ref_logits, ref_values = _forward(policy, ids, mask)
    rotations = {i: r.detach() for i, r in policy.adapter.rotations_by_layer().items()}
    assert sorted(rotations) == [0, 2, 3]
    policy.adapter.remove()
    base_logits, _ = _forward(policy, ids, mask)
    assert (base_logits - ref_logits).abs().max() > 0.05  # the rotations do change the policy

    fold_rotations(model, rotations, gate=1.0, final_readers=[policy.value_head])
    logits, values = _forward(policy, ids, mask)
    keep = mask.bool()
    assert (logits - ref_logits)[keep].abs().max() <= 1e-4
    assert (values - ref_values)[keep].abs().max() <= 1e-4
    assert not model._forward_hooks and not any(layer._forward_hooks for layer in model.model.layers)


def test_fold_composes_rotations_and_leaves_the_embeddings():
    torch.manual_seed(0)
    model = _models()["phi3"](1e-5)
    _randomise(model)
    embeddings = model.get_input_embeddings().weight.clone()
    policy = _adapted(model, layers=(1, 2))
    rotations = {i: r.detach() for i, r in policy.adapter.rotations_by_layer().items()}
    layer0 = {k: v.clone() for k, v in model.model.layers[0].state_dict().items()}
    layer1 = {k: v.clone() for k, v in model.model.layers[1].state_dict().items()}
    policy.adapter.remove()
    fold_rotations(model, rotations, gate=1.0)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    # Layers up to and including the first adapted one read the un-rotated stream: unchanged.
    for before, layer in ((layer0, model.model.layers[0]), (layer1, model.model.layers[1])):
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert torch.all(model.model.layers[2].input_layernorm.weight == 1.0)
    assert torch.all(model.model.norm.weight == 1.0)


@pytest.mark.parametrize("gate", [0.5, 0.999, 0.0])
def test_a_gate_other_than_one_is_refused_saying_why(gate):
    model = _models()["phi3"](1e-5)
    with pytest.raises(FoldError, match=rf"gate of this policy is {gate}.*not a rotation"):
        check_foldable(model, gate)


def test_an_unsupported_architecture_is_refused_by_name():
    # Gemma's RMSNorm scales by (1 + weight): the very kind of difference the fold must not guess.
    model = GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(FoldError, match=r"not supported for GemmaForCausalLM.*Phi3ForCausalLM"):
        check_foldable(model, 1.0)


def test_tied_embeddings_are_refused():
    model = Phi3ForCausalLM(Phi3Config(**{**COMMON, "tie_word_embeddings": True}))
    with pytest.raises(FoldError, match="ties lm_head to the input embeddings"):
        check_foldable(model, 1.0)


def test_an_unknown_module_in_a_layer_is_refused():
    model = _models()["phi3"](1e-5)
    model.model.layers[1].mlp.extra = torch.nn.Linear(64, 64)
    with pytest.raises(FoldError, match=r"decoder layer 1 .*mlp.extra"):
        check_foldable(model, 1.0)
