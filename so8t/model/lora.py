"""LoRA adapters through PEFT, behind the same small interface as the SO(8) adapters.

``get_peft_model`` rather than ``inject_adapter_in_model``: both inject LoRA layers into
the model in place, but only the ``PeftModel`` wrapper brings ``disable_adapter()`` (the
reference policy), the adapter-only state-dict helpers and the freezing of the base
weights, which we would otherwise hand-write. We keep calling the *underlying* HF model
(``LoraAdapters.model``, the very object that was passed in) for forward and generate:
its layers now carry LoRA, so the wrapper's own forward is not needed.

``peft`` is imported inside ``attach_lora`` because importing it costs seconds and SO(8)
runs never need it (docs/architecture.md, "LoRA").
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class LoraAdapters:
    """PEFT LoRA attached to a HF causal LM.

    Not an ``nn.Module``: the LoRA weights live inside ``model`` (which the policy already
    owns), so registering the wrapper as a submodule would only duplicate them.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()  # the HF model, LoRA layers injected

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily switch LoRA off (the reference policy)."""
        with self.peft_model.disable_adapter():
            yield

    def set_gate(self, value: float) -> None:
        """No-op: LoRA has no residual gate (its scale is fixed by alpha / r)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the LoRA weights (detached references, like ``nn.Module.state_dict``).

        ``save_embedding_layers=False``: with ``lm_head`` among the targets PEFT would
        otherwise also save the frozen base ``lm_head`` matrix (vocab x hidden), which is
        part of the base model, not of the adapter (docs/checkpoint-format.md: only the
        trainable state is stored).
        """
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.peft_model, save_embedding_layers=False))

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strict load: the keys and shapes must be exactly those of ``state_dict()``."""
        from peft import set_peft_model_state_dict

        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise KeyError(f"LoRA state dict mismatch: missing {missing}, unexpected {unexpected}")
        for key, tensor in state_dict.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"LoRA weight {key}: shape {tuple(tensor.shape)} in the state dict, "
                    f"{tuple(expected[key].shape)} in the model"
                )
        result = set_peft_model_state_dict(self.peft_model, state_dict)
        if result.unexpected_keys:
            raise KeyError(f"PEFT did not use LoRA keys {result.unexpected_keys}")


def attach_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
) -> LoraAdapters:
    """Inject LoRA into ``model`` in place and freeze its base weights.

    ``target_modules`` are module-name suffixes as in PEFT; include ``lm_head`` for small
    models (without it the tiny model did not learn; docs/architecture.md, "LoRA").
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(r),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    adapters = LoraAdapters(peft_model)
    logger.info(
        "attached LoRA r=%s alpha=%s to %s (%d trainable parameters)",
        r, alpha, list(target_modules), sum(p.numel() for p in adapters.trainable_parameters()),
    )
    return adapters
