"""SO(8) residual rotation adapters (docs/architecture.md, "SO(8) residual rotation adapters").

The hidden state is split into blocks of 8 channels. Each block gets a rotation
``R = exp(A)`` with ``A`` a learnable skew-symmetric 8x8 matrix (28 free numbers), so ``R``
is exactly in SO(8). After chosen decoder layers the residual stream becomes
``h' = h + g * (R h - h)``.

The adapters are forward hooks on the decoder layers, so they act *inside* the model's
forward pass: they change the logits, the values computed from the final hidden state and
``generate()``. Switching them off (``disabled()``) gives back the base model bit for bit,
which is how the PPO reference policy is obtained without a second copy of the model.

Hand-written rather than PEFT: PEFT has no rotation-of-the-residual-stream adapter.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

BLOCK = 8
# Number of free entries of a skew-symmetric 8x8 matrix (its strict upper triangle).
FREE_PER_BLOCK = BLOCK * (BLOCK - 1) // 2  # 28


class So8Rotation(nn.Module):
    """Blockwise SO(8) rotations of a hidden vector of size ``hidden_size``.

    The parameter ``skew`` holds, per block, the 28 strict-upper-triangle entries of ``A``.
    It stays in fp32 whatever the model dtype: ``matrix_exp`` of small matrices is cheap
    and fp32 keeps tiny updates of ``A`` from being rounded away in bf16.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.0) -> None:
        super().__init__()
        if hidden_size <= 0 or hidden_size % BLOCK != 0:
            raise ValueError(
                f"SO(8) adapters need a hidden size that is a positive multiple of {BLOCK}; "
                f"got hidden_size={hidden_size}"
            )
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.hidden_size = hidden_size
        self.num_blocks = hidden_size // BLOCK
        skew = torch.zeros(self.num_blocks, FREE_PER_BLOCK, dtype=torch.float32)
        if init_std > 0:
            skew.normal_(0.0, init_std)
        self.skew = nn.Parameter(skew)
        # Non-persistent buffer: moves with .to(device) but is not part of the state dict.
        rows, cols = torch.triu_indices(BLOCK, BLOCK, offset=1)
        self.register_buffer("_triu_flat", rows * BLOCK + cols, persistent=False)
        # ``R - I`` computed once for a stretch of no-grad forwards with fixed weights (see
        # So8Adapters.frozen); None outside it.
        self._frozen_delta: torch.Tensor | None = None

    def generator(self) -> torch.Tensor:
        """The skew-symmetric matrices ``A``, shape (num_blocks, 8, 8), fp32."""
        flat = self.skew.new_zeros(self.num_blocks, BLOCK * BLOCK)
        upper = flat.index_copy(1, self._triu_flat, self.skew).view(self.num_blocks, BLOCK, BLOCK)
        return upper - upper.transpose(-1, -2)

    def rotation(self) -> torch.Tensor:
        """The rotations ``R = exp(A)``, shape (num_blocks, 8, 8), fp32, each in SO(8)."""
        return torch.linalg.matrix_exp(self.generator())

    def delta_operator(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``R - I`` per block, shape (num_blocks, 8, 8), in ``dtype``."""
        eye = torch.eye(BLOCK, dtype=torch.float32, device=self.skew.device)
        return (self.rotation() - eye).to(dtype)

    def forward(self, h: torch.Tensor, gate: float = 1.0) -> torch.Tensor:
        """Return ``h + gate * (R h - h)`` applied blockwise on the last dimension."""
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"expected last dim {self.hidden_size}, got {tuple(h.shape)}")
        # (R - I) h rather than R h - h: with A = 0, R - I is exactly zero (matrix_exp(0) is
        # exactly I), so the update is exactly zero even where matmuls are inexact (TF32 on
        # GPU would round h @ I). It also avoids cancellation when R is close to I.
        delta_op = self._frozen_delta
        if delta_op is None or torch.is_grad_enabled() or delta_op.dtype != h.dtype:
            delta_op = self.delta_operator(h.dtype)
        blocks = h.unflatten(-1, (self.num_blocks, BLOCK))
        delta = torch.einsum("...bj,bij->...bi", blocks, delta_op).flatten(-2)
        return h + gate * delta


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a HF causal LM (``get_decoder().layers`` or ``model.layers``)."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except (AttributeError, NotImplementedError, ValueError):
            pass
    candidates.append(getattr(model, "model", None))
    for module in candidates:
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected "
        "model.get_decoder().layers or model.model.layers"
    )


def resolve_layer_indices(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Normalise layer indices: None = all, negatives count from the end; sorted, unique."""
    if layers is None:
        return list(range(num_layers))
    resolved = []
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"layer index must be an int, got {index!r}")
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"layer index {index} is out of range for a model with {num_layers} layers "
                f"(valid: {-num_layers}..{num_layers - 1})"
            )
        resolved.append(index % num_layers)
    if not resolved:
        raise ValueError("adapter layers list is empty; use null for all layers")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layer indices {list(layers)} name the same layer twice")
    return sorted(resolved)


class So8Adapters(nn.Module):
    """SO(8) rotations hooked onto the decoder layers of a HF causal LM.

    Only the rotations are parameters of this module (the model is *not* a submodule), so
    ``state_dict()`` holds just the adapter weights: keys ``rotations.<layer>.skew``.
    """

    def __init__(self, hidden_size: int, layer_indices: Sequence[int], init_std: float = 0.0) -> None:
        super().__init__()
        self.layer_indices = list(layer_indices)
        self.rotations = nn.ModuleDict(
            {str(i): So8Rotation(hidden_size, init_std) for i in self.layer_indices}
        )
        self.gate: float = 1.0
        self.enabled: bool = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def attach(
        cls, model: nn.Module, layers: Sequence[int] | None = None, init_std: float = 0.0
    ) -> "So8Adapters":
        """Create adapters for ``model`` and hook them onto the chosen decoder layers.

        The base model's parameters are frozen (as PEFT does when it attaches LoRA): the
        rotations are the only trainable parameters.
        """
        decoder_layers = find_decoder_layers(model)
        indices = resolve_layer_indices(layers, len(decoder_layers))
        hidden_size = model.config.hidden_size
        adapters = cls(hidden_size, indices, init_std)
        param = next(model.parameters(), None)
        if param is not None:
            adapters.to(param.device)  # rotations stay fp32 on the model's device
        model.requires_grad_(False)
        for i in indices:
            adapters._handles.append(decoder_layers[i].register_forward_hook(adapters._hook(str(i))))
        logger.info(
            "attached SO(8) adapters to layers %s of %d (%d trainable parameters)",
            indices, len(decoder_layers), sum(p.numel() for p in adapters.parameters()),
        )
        return adapters

    def _hook(self, key: str):
        rotation = self.rotations[key]

        def hook(module: nn.Module, args, output):
            if not self.enabled:
                return None  # None = leave the layer's output untouched
            # transformers 5.x decoder layers return the hidden states as a tensor; 4.x
            # returned a tuple (hidden_states, *optional extras). Rewrite only the hidden states.
            if isinstance(output, torch.Tensor):
                return rotation(output, self.gate)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (rotation(output[0], self.gate), *output[1:])
            raise TypeError(
                f"SO(8) hook: unsupported decoder layer output type {type(output).__name__}"
            )

        return hook

    def remove(self) -> None:
        """Detach the hooks; the model is the plain base model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily switch the adapters off (the reference policy)."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    @contextlib.contextmanager
    def frozen(self, dtype: torch.dtype = torch.float32) -> Iterator[None]:
        """Compute every ``R - I`` once for the no-grad forwards inside the block.

        For the sampling loop, which runs one forward per generated token with weights that
        do not change: without it each forward recomputes ``matrix_exp`` in every adapted
        layer. The cached operator is the very tensor a forward would compute, so results
        are bit-identical. Forwards with gradients enabled ignore the cache; the weights
        must not change inside the block.
        """
        with torch.no_grad():
            for rotation in self.rotations.values():
                rotation._frozen_delta = rotation.delta_operator(dtype)
        try:
            yield
        finally:
            for rotation in self.rotations.values():
                rotation._frozen_delta = None

    def set_gate(self, value: float) -> None:
        self.gate = float(value)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def rotations_by_layer(self) -> dict[int, torch.Tensor]:
        """``{layer index: R}`` with R of shape (hidden/8, 8, 8); handy for diagnostics."""
        return {int(k): r.rotation() for k, r in self.rotations.items()}


def attach_so8_adapters(
    model: nn.Module, layers: Sequence[int] | None = None, init_std: float = 0.0
) -> So8Adapters:
    """Functional alias of :meth:`So8Adapters.attach`."""
    return So8Adapters.attach(model, layers, init_std)
