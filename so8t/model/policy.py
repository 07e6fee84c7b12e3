"""Policy with a value head on a shared trunk.

One pass through the frozen base model (with its adapters active) gives both the logits
(through ``lm_head``) and the values (through a small fp32 value head) from the same final
hidden state. The reference policy is the same model with the adapters switched off
(``reference()``), never a second copy.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from so8t.model.prefix import capture_prefix, first_adapted_layer, recording_prefix, reusing_prefix
from so8t.model.so8 import attach_so8_adapters

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "adapter."
VALUE_HEAD_PREFIX = "value_head."


@dataclass
class PolicyOutput:
    logits: torch.Tensor  # (B, T, vocab), in the model's dtype
    values: torch.Tensor  # (B, T), fp32
    past_key_values: Any = None  # the HF cache object when use_cache=True, else None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at the first real token (pads get 0 too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    # A PeftModel keeps the HF model (with LoRA injected in place) as its base model.
    if type(model).__module__.startswith("peft") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _decoder_of(model: nn.Module) -> nn.Module:
    """The trunk that returns the final (normed) hidden states of a HF causal LM."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    decoder = getattr(model, "model", None)
    if isinstance(decoder, nn.Module):
        return decoder
    raise ValueError(f"cannot find the decoder of {type(model).__name__} (get_decoder() or .model)")


def _lm_head_of(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"cannot find the output head of {type(model).__name__}")
    return head


def _cache_kwarg(decoder: nn.Module) -> str:
    # transformers 5.x renamed the decoder's `past_key_values` argument to `cache` (the old
    # name is deprecated); older versions only know `past_key_values`.
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PolicyWithValue(nn.Module):
    """Frozen HF causal LM + adapters (SO(8), LoRA or none) + fp32 value head."""

    def __init__(self, base: nn.Module, adapter: Any = None) -> None:
        super().__init__()
        self.base = _unwrap_peft(base)
        # SO(8) adapters are an nn.Module and become a submodule (.to() moves them). LoRA
        # adapters are a plain object: their weights already live inside `base`.
        self.adapter = adapter
        self._cache_kwarg = _cache_kwarg(_decoder_of(self.base))
        # Found now, while LoRA's parameters are trainable (switching it off for the reference
        # pass freezes them); 0 (nothing to reuse) where the decoder layers cannot be found.
        try:
            self._first_adapted = first_adapted_layer(self.base, adapter)
        except ValueError:
            self._first_adapted = 0
        hidden = self.base.config.hidden_size
        param = next(self.base.parameters())
        self.value_head = nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
        # Zero init (as in lm-human-preferences / Huang et al. 2023): values start at 0, so
        # the first advantages are the returns themselves rather than returns minus noise
        # from a random head; the weight still gets gradients from the hidden state.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    # ----------------------------------------------------------------- forward pass

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        output_slice: slice | None = None,
        prefix: torch.Tensor | None = None,
    ) -> PolicyOutput:
        """One trunk pass → logits and values.

        ``attention_mask`` covers the cached tokens plus the new ones. Without
        ``position_ids`` they are derived from the mask (left padding), for the new tokens
        only, so incremental decoding with a cache needs no extra bookkeeping.

        ``output_slice`` selects the positions (of the new tokens) that get logits and
        values; None means all. PPO needs them only at response positions, and ``lm_head``
        over a large vocabulary at every query position is the costliest matmul of a pass.

        ``prefix``: the hidden states entering the first adapted layer for exactly these
        inputs (``frozen_prefix``); the frozen layers below it are then skipped.
        """
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1]:]
        decoder = _decoder_of(self.base)
        reuse = (contextlib.nullcontext() if prefix is None
                 else reusing_prefix(decoder, self.first_adapted_layer, prefix))
        with reuse:
            out = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{self._cache_kwarg: past_key_values},
            )
        hidden = out.last_hidden_state  # after the final norm
        if output_slice is not None:
            hidden = hidden[:, output_slice]
        logits = _lm_head_of(self.base)(hidden)
        values = self.value_head(hidden.float()).squeeze(-1)
        cache = getattr(out, self._cache_kwarg, None) if use_cache else None
        return PolicyOutput(logits=logits, values=values, past_key_values=cache)

    @property
    def first_adapted_layer(self) -> int:
        """Decoder layers below this index are never changed by the adapters (fixed once built)."""
        return self._first_adapted

    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Hidden states entering the first adapted layer (no grad), for ``forward(prefix=...)``;
        None when the adapters start at layer 0 and there is nothing to reuse."""
        if self.first_adapted_layer < 1:
            return None
        return capture_prefix(
            _decoder_of(self.base), self.first_adapted_layer, input_ids=input_ids,
            attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask), use_cache=False,
        )

    @contextlib.contextmanager
    def recording_prefix(self) -> Iterator[list[torch.Tensor] | None]:
        """Forwards inside the block record their frozen prefix into the yielded list, one
        tensor per forward (None when the adapters start at layer 0)."""
        if self.first_adapted_layer < 1:
            yield None
            return
        with recording_prefix(_decoder_of(self.base), self.first_adapted_layer) as recorded:
            yield recorded

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """HF ``generate`` of the adapted model (adapters act inside its forward)."""
        return self.base.generate(*args, **kwargs)

    # ------------------------------------------------------- adapters and reference

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy: the same model with the adapters switched off."""
        if self.adapter is None:
            yield
            return
        with self.adapter.disabled():
            yield

    @contextlib.contextmanager
    def frozen_adapters(self) -> Iterator[None]:
        """No-grad forwards with fixed weights inside: adapters may precompute their
        operators once (the SO(8) rotations) instead of once per forward."""
        frozen = getattr(self.adapter, "frozen", None)
        if frozen is None:
            yield
            return
        with frozen(next(self.base.parameters()).dtype):
            yield

    def train_without_dropout(self) -> "PolicyWithValue":
        """Training mode only where training needs it; evaluation mode (no dropout) elsewhere.

        PPO's ratio compares log-probs of the same tokens under two forwards; dropout would
        make them differ by noise, not by learning. HF layers checkpoint their activations
        only when they are in training mode, so the modules that carry gradient checkpointing
        stay in it (they hold no dropout of their own: attention dropout follows the attention
        module's mode, residual dropouts are ``nn.Dropout`` submodules).
        """
        self.eval()
        for module in self.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True
        return self

    def set_gate(self, value: float) -> None:
        if self.adapter is not None:
            self.adapter.set_gate(value)

    def enable_gradient_checkpointing(self) -> bool:
        """Turn on activation checkpointing in the base; False if it is not supported.

        ``use_reentrant=False``: the reentrant variant drops gradients when a checkpointed
        block's inputs do not require grad, which is the case with a frozen trunk. HF only
        checkpoints while the model is in train mode.
        """
        if not getattr(self.base, "supports_gradient_checkpointing", False):
            logger.warning("%s does not support gradient checkpointing", type(self.base).__name__)
            return False
        kwargs = {"use_reentrant": False}
        if hasattr(self.base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return True

    # --------------------------------------------------------- trainable state

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.adapter.trainable_parameters()) if self.adapter is not None else []
        return params + list(self.value_head.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter and value-head tensors only (detached references: clone to snapshot)."""
        state = {}
        if self.adapter is not None:
            state.update({ADAPTER_PREFIX + k: v for k, v in self.adapter.state_dict().items()})
        state.update({VALUE_HEAD_PREFIX + k: v for k, v in self.value_head.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strict inverse of ``trainable_state_dict``."""
        adapter_sd, head_sd, unknown = {}, {}, []
        for key, tensor in state_dict.items():
            if key.startswith(ADAPTER_PREFIX):
                adapter_sd[key[len(ADAPTER_PREFIX):]] = tensor
            elif key.startswith(VALUE_HEAD_PREFIX):
                head_sd[key[len(VALUE_HEAD_PREFIX):]] = tensor
            else:
                unknown.append(key)
        if unknown:
            raise KeyError(f"unexpected keys in trainable state dict: {unknown}")
        if self.adapter is None:
            if adapter_sd:
                raise KeyError(f"adapter weights given but the policy has no adapter: {sorted(adapter_sd)}")
        else:
            self.adapter.load_state_dict(adapter_sd)  # strict by default (nn.Module and LoRA)
        self.value_head.load_state_dict(head_sd, strict=True)


def build_policy(base_model: nn.Module, adapter_cfg: Any) -> PolicyWithValue:
    """Freeze ``base_model``, attach the configured adapters, add a value head.

    ``adapter_cfg`` has attribute access (a dataclass or OmegaConf node): ``kind`` "so8"
    (``layers``, ``init_std``) or "lora" (``r``, ``alpha``, ``dropout``, ``target_modules``);
    None means no adapter (only the value head trains).
    """
    base_model.requires_grad_(False)
    if adapter_cfg is None:
        adapter = None
    elif adapter_cfg.kind == "so8":
        layers = None if adapter_cfg.layers is None else [int(i) for i in adapter_cfg.layers]
        adapter = attach_so8_adapters(base_model, layers, float(adapter_cfg.init_std))
    elif adapter_cfg.kind == "lora":
        from so8t.model.lora import attach_lora  # imports peft (slow) only when needed

        adapter = attach_lora(
            base_model,
            r=adapter_cfg.r,
            alpha=adapter_cfg.alpha,
            dropout=adapter_cfg.dropout,
            target_modules=[str(m) for m in adapter_cfg.target_modules],
        )
    else:
        raise ValueError(f"unknown adapter kind {adapter_cfg.kind!r}; expected 'so8' or 'lora'")
    return PolicyWithValue(base_model, adapter)
