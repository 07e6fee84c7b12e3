"""Load an export folder back as a SO8T policy (model + value head), for ``so8t.load_policy``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from so8t.config.identity import upgrade_section
from so8t.export.errors import ExportError
from so8t.export.source import EXPORT_META_FILE


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / EXPORT_META_FILE).is_file()


def load_export(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """A :class:`so8t.final_policy.LoadedPolicy` from a folder written by ``so8t-export``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from so8t.build import DTYPES
    from so8t.final_policy import LoadedPolicy
    from so8t.model.policy import PolicyWithValue

    path = Path(path)
    try:
        meta = json.loads((path / EXPORT_META_FILE).read_text(encoding="utf-8"))
        layout = meta["layout"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path / EXPORT_META_FILE} is not a readable export description: {exc!r}") from exc
    torch_device, torch_dtype = torch.device(device), DTYPES[dtype]
    if layout == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(torch_device)
        adapter = None
    elif layout == "peft":
        from omegaconf import OmegaConf
        from peft import PeftModel

        from so8t.model.loading import load_base_model
        from so8t.model.lora import LoraAdapters

        model_cfg = OmegaConf.create(upgrade_section("model", meta["model"]))  # older key names too
        base, _ = load_base_model(model_cfg, dtype=torch_dtype, device=torch_device)
        adapter = LoraAdapters(PeftModel.from_pretrained(base, str(path)).to(torch_device))
        model = adapter.model
    else:
        raise ExportError(f"{path / EXPORT_META_FILE}: unknown layout {layout!r}")
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    policy = PolicyWithValue(model, adapter)
    policy.value_head.load_state_dict(load_file(str(path / meta.get("value_head", "value_head.safetensors"))))
    policy.eval()
    from so8t.model.stops import stop_token_ids

    stop_ids = meta.get("stop_token_ids") or stop_token_ids(model, tokenizer)
    return LoadedPolicy(policy, tokenizer, torch_device, stop_ids, meta.get("prompting"))
