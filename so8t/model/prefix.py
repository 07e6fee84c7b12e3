"""Frozen-prefix reuse: the decoder layers below the first adapter, computed once per rollout.

Within one PPO update nothing below the first adapted layer ``k`` changes: the base is frozen
and the adapters (SO(8) hooks or LoRA modules) only act from layer ``k`` on. The hidden states
entering layer ``k`` are therefore the same in the reference pass, in an old-log-prob
recompute and in every PPO epoch. ``recording_prefix`` keeps them from a full pass that runs
anyway (the reference pass), ``capture_prefix`` computes them alone (no grad);
``reusing_prefix`` then runs the decoder with layers ``0..k-1`` reduced to a pass-through whose
last one hands over the captured states, so a forward costs only the layers from ``k`` on.
Nothing else changes: embeddings, masks and rotary embeddings are computed by the model's own
forward as usual, which keeps this independent of the architecture's details (any HF decoder
that loops over ``decoder.layers``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from so8t.model.so8 import find_decoder_layers


class _PrefixCaptured(Exception):
    """Raised by the capture hook to stop the forward once the prefix is known."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("prefix captured")
        self.hidden = hidden


def first_adapted_layer(model: nn.Module, adapter) -> int:
    """Index of the first decoder layer whose computation the adapters change.

    SO(8) adapters rotate the output of their layers, so that layer's own computation is still
    the base's, but its output is not: the prefix ends before it. LoRA (or any adapter that
    lives inside the layers) is found by its trainable parameters. No adapter in the decoder
    layers (none, or LoRA on ``lm_head`` only) means every layer is frozen.
    """
    layers = find_decoder_layers(model)
    indices = getattr(adapter, "layer_indices", None)
    if indices:
        return min(int(i) for i in indices)
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(layers)


@torch.no_grad()
def capture_prefix(decoder: nn.Module, first_adapted: int, **forward_kwargs) -> torch.Tensor:
    """The hidden states entering layer ``first_adapted`` for the given decoder inputs.

    Runs the decoder's own forward up to and including layer ``first_adapted - 1`` and stops
    there (the layers above, the final norm and the heads are not computed)."""
    if first_adapted < 1:
        raise ValueError("there is no frozen prefix before layer 0")
    last_frozen = decoder.layers[first_adapted - 1]

    def hook(module, args, output):
        raise _PrefixCaptured(output[0] if isinstance(output, tuple) else output)

    handle = last_frozen.register_forward_hook(hook)
    try:
        decoder(**forward_kwargs)
    except _PrefixCaptured as captured:
        return captured.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"{type(decoder).__name__} never called decoder layer {first_adapted - 1}")


@contextlib.contextmanager
def recording_prefix(decoder: nn.Module, first_adapted: int) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every decoder forward appends the hidden states entering layer
    ``first_adapted`` (detached) to the yielded list: a full pass that is run anyway (the reference
    pass) hands over the prefix at no extra cost."""
    recorded: list[torch.Tensor] = []

    def hook(module, args, output):
        recorded.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = decoder.layers[first_adapted - 1].register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


@contextlib.contextmanager
def reusing_prefix(decoder: nn.Module, first_adapted: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, decoder forwards skip layers ``0..first_adapted-1`` and start from
    ``hidden`` (the captured states of exactly the rows and positions being passed).

    The skipped layers' ``forward`` is replaced on the instance (the module tree is untouched,
    so hooks, state dicts and gradient checkpointing of the other layers work as before)."""
    layers = decoder.layers[:first_adapted]

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def hand_over(hidden_states, *args, **kwargs):
        if hidden_states.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"frozen prefix of shape {tuple(hidden.shape)} does not match the "
                             f"forward's input {tuple(hidden_states.shape)}")
        return hidden

    for layer in layers[:-1]:
        layer.forward = passthrough
    layers[-1].forward = hand_over
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
