"""Fold SO(8) residual rotations into the weights of the base model, exactly.

An adapter after decoder layer ``i`` (with gate 1) replaces the residual stream ``x`` by
``Q x``, ``Q`` block-diagonal with one ``R = exp(A)`` in SO(8) per block of 8 channels
(column-vector convention, as in :mod:`so8t.model.so8`). The plain model cannot rotate its
stream, so instead the layers above ``i`` are rewritten to work on the *un-rotated* stream
``s`` with ``x = M s``, where ``M`` is the product of the rotations passed so far:

* a weight that reads the stream through an RMSNorm sees ``norm(M s) * γ = γ ⊙ M s / rms(s)``
  (``rms`` is unchanged by an orthogonal ``M``, eps included, since it only uses ``|x|²``), so
  ``W_read ← W_read · diag(γ) · M`` and the norm's weight becomes 1. ``diag(γ)`` does not
  commute with ``M``, which is why γ must be folded into the reader first;
* a weight that writes into the stream must write ``Mᵀ`` of what it wrote before:
  ``W_write ← Mᵀ · W_write`` and ``b_write ← Mᵀ · b_write``;
* the final norm and ``lm_head`` (and the value head, which reads the same final hidden
  state) are readers with the product of all rotations.

The embeddings write into the stream before layer 0, where ``M = I`` (adapters only sit
*after* layers), so they are unchanged. Readers' biases are added after the product and are
unchanged too. Every ``M`` is block-diagonal with the same 8-blocks, so all products are done
per block (``hidden × 8`` work per row instead of ``hidden²``).

Exactness needs an orthogonal map: with a gate ``g ≠ 1`` the adapter is
``h + g (R h − h) = ((1 − g) I + g R) h``, which changes the norm of ``h``, so RMSNorm is no
longer invariant and no rewrite of the weights reproduces it. Such policies are refused.

Hand-written: no library folds residual-stream rotations (the same algebra is behind
QuaRot/SpinQuant, which apply it to quantisation, not to adapters).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from so8t.export.errors import FoldError
from so8t.model.so8 import BLOCK, find_decoder_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldSpec:
    """Which modules of one decoder layer read the stream (per norm) and write into it."""

    readers: Mapping[str, tuple[str, ...]]  # norm module name -> linear modules reading its output
    writers: tuple[str, ...]


_PHI3 = FoldSpec(
    readers={"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",)},
    writers=("self_attn.o_proj", "mlp.down_proj"),
)
_LLAMA_LIKE = FoldSpec(
    readers={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    writers=("self_attn.o_proj", "mlp.down_proj"),
)

# Architectures the fold is proven for by tests (tests/test_export_fold.py): the decoder
# layer is pre-norm, ``h + o_proj(attn(norm1 h)); h + down_proj(mlp(norm2 h))``, then a final
# RMSNorm and lm_head. Others may well work but are refused until a test proves them.
SUPPORTED: dict[str, FoldSpec] = {
    "Phi3ForCausalLM": _PHI3,
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
}
# RMSNorm classes of the form ``weight * x / sqrt(mean(x²) + eps)`` (no bias, no ``1 + weight``).
_RMSNORMS = frozenset({"Phi3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})


def check_foldable(model: nn.Module, gate: float | None) -> FoldSpec:
    """The fold spec for ``model``; FoldError naming the obstacle if it cannot be folded exactly."""
    if gate is not None and float(gate) != 1.0:
        raise FoldError(
            f"the SO(8) gate of this policy is {gate!r}, not 1: with g != 1 the adapter maps "
            "h -> h + g(Rh - h), which is not a rotation (it changes |h|, so the RMSNorms after it "
            "see a different scale), and no rewrite of the base weights reproduces it exactly. "
            "Export a checkpoint taken once the gate schedule reached 1, or train with gate target 1."
        )
    name = type(model).__name__
    spec = SUPPORTED.get(name)
    if spec is None:
        raise FoldError(
            f"merging SO(8) rotations is not supported for {name}: it is proven (by test) only for "
            f"{', '.join(sorted(SUPPORTED))}"
        )
    if getattr(model.config, "tie_word_embeddings", False) or _same_tensor(
        model.get_input_embeddings().weight, model.get_output_embeddings().weight
    ):
        raise FoldError(
            f"{name} ties lm_head to the input embeddings: the fold must rotate lm_head "
            "(it reads the rotated stream) but not the embeddings (they write before any rotation), "
            "which one shared matrix cannot do. Untie them in the base model "
            "(tie_word_embeddings=false, lm_head a copy of the embeddings) and train on that."
        )
    hidden = model.config.hidden_size
    for index, layer in enumerate(find_decoder_layers(model)):
        known = {m for names in spec.readers.values() for m in names} | set(spec.writers)
        linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        if linears != known:
            raise FoldError(
                f"decoder layer {index} of {name} has linear modules {sorted(linears)}, expected "
                f"{sorted(known)}: the fold does not know how they use the residual stream"
            )
        for norm_name in spec.readers:
            _check_rmsnorm(layer.get_submodule(norm_name), f"layer {index} {norm_name}")
        for reader in (m for names in spec.readers.values() for m in names):
            if layer.get_submodule(reader).in_features != hidden:
                raise FoldError(f"layer {index} {reader} does not read the hidden size {hidden}")
        for writer in spec.writers:
            if layer.get_submodule(writer).out_features != hidden:
                raise FoldError(f"layer {index} {writer} does not write the hidden size {hidden}")
    _check_rmsnorm(_final_norm(model), "the final norm")
    return spec


def fold_rotations(
    model: nn.Module,
    rotations: Mapping[int, torch.Tensor],
    gate: float | None = 1.0,
    final_readers: Iterable[nn.Linear] = (),
) -> None:
    """Rewrite ``model``'s weights in place so that, without hooks, it computes what it
    computed with the rotations ``{layer index: R (hidden/8, 8, 8)}`` applied after those
    layers. ``final_readers`` are extra linear maps on the final normed hidden state (the
    value head); they are rewritten like ``lm_head``. The rotation hooks must be removed
    from ``model`` by the caller.
    """
    spec = check_foldable(model, gate)
    layers = find_decoder_layers(model)
    hidden = model.config.hidden_size
    num_blocks = hidden // BLOCK
    for index, rotation in rotations.items():
        if not 0 <= index < len(layers):
            raise FoldError(f"rotation for layer {index}, but the model has {len(layers)} layers")
        if tuple(rotation.shape) != (num_blocks, BLOCK, BLOCK):
            raise FoldError(f"rotation for layer {index} has shape {tuple(rotation.shape)}, "
                            f"expected {(num_blocks, BLOCK, BLOCK)}")
    # fp64 for the bookkeeping: the products of several rotations and the rewritten weights
    # are then as exact as the weights' own dtype allows.
    device = next(model.parameters()).device
    basis = torch.eye(BLOCK, dtype=torch.float64, device=device).expand(num_blocks, BLOCK, BLOCK).clone()
    identity = True
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if not identity:
                for norm_name, readers in spec.readers.items():
                    norm = layer.get_submodule(norm_name)
                    for reader in readers:
                        _fold_reader(layer.get_submodule(reader), norm.weight, basis)
                    norm.weight.fill_(1.0)
                for writer in spec.writers:
                    _fold_writer(layer.get_submodule(writer), basis)
            if index in rotations:
                # The hook maps the layer's output x to R x: the basis becomes R · M.
                basis = torch.einsum("bij,bjk->bik", rotations[index].to(device, torch.float64), basis)
                identity = False
        if not identity:
            norm = _final_norm(model)
            for reader in [model.get_output_embeddings(), *final_readers]:
                _fold_reader(reader, norm.weight, basis)
            norm.weight.fill_(1.0)
    log.info("folded SO(8) rotations of layers %s into %s", sorted(rotations), type(model).__name__)


def _fold_reader(linear: nn.Linear, gamma: torch.Tensor, basis: torch.Tensor) -> None:
    """W ← W · diag(γ) · M, with M block-diagonal (blocks of 8 on the input dimension)."""
    weight = linear.weight
    scaled = weight.to(torch.float64) * gamma.to(weight.device, torch.float64)
    blocks = scaled.unflatten(1, (basis.shape[0], BLOCK))  # (out, blocks, 8)
    weight.copy_(torch.einsum("obi,bij->obj", blocks, basis).flatten(1).to(weight.dtype))


def _fold_writer(linear: nn.Linear, basis: torch.Tensor) -> None:
    """W ← Mᵀ · W and b ← Mᵀ · b (blocks of 8 on the output dimension)."""
    weight = linear.weight
    blocks = weight.to(torch.float64).unflatten(0, (basis.shape[0], BLOCK))  # (blocks, 8, in)
    weight.copy_(torch.einsum("bij,bin->bjn", basis, blocks).flatten(0, 1).to(weight.dtype))
    if linear.bias is not None:
        bias = linear.bias.to(torch.float64).unflatten(0, (basis.shape[0], BLOCK))
        linear.bias.copy_(torch.einsum("bij,bi->bj", basis, bias).flatten().to(linear.bias.dtype))


def _final_norm(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise FoldError(f"cannot find the final norm of {type(model).__name__} (expected .model.norm)")
    return norm


def _check_rmsnorm(norm: nn.Module, where: str) -> None:
    if type(norm).__name__ not in _RMSNORMS or getattr(norm, "bias", None) is not None:
        raise FoldError(f"{where} is a {type(norm).__name__}, not an RMSNorm the fold is proven for "
                        f"({', '.join(sorted(_RMSNORMS))})")


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.data_ptr() == b.data_ptr()
