"""A quantised frozen base through bitsandbytes: ``model.quantization: none | nf4 | int8``.

The base's decoder-layer linears are stored in 4 bit (NF4, double-quantised, computing in the
run's dtype) or 8 bit (LLM.int8); embeddings, norms and ``lm_head`` stay in the run's dtype,
and the adapters and value head keep their own fp32 parameters on top. bitsandbytes kernels
run on CUDA only, so the check below refuses a quantised config elsewhere before anything is
loaded. Quantisation needs a model loaded with ``from_pretrained``: transformers quantises the
weights while it reads them, straight onto the device.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from so8t.config.schema import Quantization
from so8t.errors import SetupError

KINDS = tuple(kind.value for kind in Quantization)


def check_quantization(kind: str, device: Any) -> None:
    """Refuse a quantised base where it cannot run; a no-op for ``none``."""
    if kind == "none":
        return
    if kind not in KINDS:
        raise SetupError(f"model.quantization={kind!r} must be one of {', '.join(KINDS)}")
    device_type = str(getattr(device, "type", device)).split(":")[0]
    if device_type != "cuda":
        raise SetupError(
            f"model.quantization={kind} needs a CUDA device (bitsandbytes kernels run on CUDA only), but "
            f"hardware.device is {device}. Use model.quantization=none here, or hardware=rtx3060 on a GPU.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SetupError(
            f"model.quantization={kind} needs bitsandbytes, which is not installed: "
            "`pip install bitsandbytes` (or `pip install -e \".[quant]\"`), or set model.quantization=none.")


def quantization_config(kind: str, compute_dtype):
    """The ``BitsAndBytesConfig`` for ``from_pretrained`` (None for ``none``)."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
