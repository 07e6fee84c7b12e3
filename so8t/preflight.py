"""Memory preflight: does this config fit ``hardware.memory_budget_gb``? Answered before any weight
is loaded, from the model's ``config.json`` and its parameter count on the meta device.

``check_memory`` runs at the start of every run that has a budget (``hardware.memory_check``
says whether an over-budget estimate refuses the run, warns or is ignored);
``so8t-train ... +preflight=true`` prints the breakdown and exits (``report``). The estimator
itself is ``so8t.model.memory``; this module turns a composed config into its inputs and, when a
config does not fit, names the knobs that would make it fit.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from so8t.errors import ModelNotAvailableError, SetupError
from so8t.model.memory import GIB, MemoryEstimate, ModelShape, RunShape, estimate, format_table

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FREE_PER_SO8_BLOCK = 28  # entries of a skew-symmetric 8x8 generator


# ----------------------------------------------------------------------------- model shape

def _config_source(model_cfg) -> tuple[str | Path, bool]:
    from so8t.model.tiny import TINY_DIR

    if model_cfg.kind == "tiny":
        return TINY_DIR, True
    if model_cfg.kind == "local":
        folder = Path(str(model_cfg.path)).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelNotAvailableError(
                f"model.path={model_cfg.path}: no config.json there, so the memory preflight cannot size the "
                "model. Set model.path to a folder written by save_pretrained.")
        return folder, True
    return str(model_cfg.path), bool(model_cfg.local_files_only)


def load_model_config(model_cfg):
    """The model's ``PretrainedConfig`` (a small JSON file; no weights are read)."""
    from transformers import AutoConfig

    where, local_only = _config_source(model_cfg)
    try:
        return AutoConfig.from_pretrained(where, local_files_only=local_only,
                                          trust_remote_code=bool(model_cfg.trust_remote_code))
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(
            f"model.path={model_cfg.path}: cannot read the model's config for the memory preflight "
            f"({exc}). Download the model once (`hf download {model_cfg.path}`) or point model=local "
            "model.path at a folder that holds it.") from exc


def meta_model(config, trust_remote_code: bool = False):
    """The model with every parameter on the meta device: shapes without memory, in well under a second."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def model_shape(config, model) -> ModelShape:
    from torch import nn

    from so8t.model.so8 import find_decoder_layers

    layers = find_decoder_layers(model)
    linear = [m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear)]
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    return ModelShape(
        num_layers=len(layers),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", 4 * hidden)),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        vocab=int(model.get_output_embeddings().weight.shape[0]),
        params_total=sum(p.numel() for p in model.parameters()),
        params_quantisable=sum(linear),
        largest_linear=max(linear, default=0),
    )


def _adapter_layout(adapter_cfg, model, num_layers: int, hidden: int) -> tuple[int, int, str]:
    """(first adapted layer, trainable parameters including the value head, kind)."""
    from torch import nn

    from so8t.model.so8 import find_decoder_layers, resolve_layer_indices

    value_head = hidden + 1
    if adapter_cfg is None:
        return num_layers, value_head, "none"
    if adapter_cfg.kind == "so8":
        layers = None if adapter_cfg.layers is None else [int(i) for i in adapter_cfg.layers]
        try:
            indices = resolve_layer_indices(layers, num_layers)
        except ValueError as exc:
            raise SetupError(f"adapter.layers: {exc}") from exc
        return indices[0], len(indices) * hidden // 8 * FREE_PER_SO8_BLOCK + value_head, "so8"
    targets = [str(t) for t in adapter_cfg.target_modules]
    decoder_layers = list(find_decoder_layers(model))
    first, trainable = num_layers, value_head
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            trainable += int(adapter_cfg.r) * (module.in_features + module.out_features)
            for index, layer in enumerate(decoder_layers):
                if any(m is module for m in layer.modules()):
                    first = min(first, index)
                    break
    return first, trainable, "lora"


def _prompt_tokens(data_cfg) -> int:
    if data_cfg.kind == "jsonl":
        return int(data_cfg.max_prompt_tokens)  # the loader refuses longer prompts
    # "a+b=": at most one token per character for byte-level and character tokenizers.
    return 2 * len(str(data_cfg.max_operand)) + 2


# fp32 tensors per parameter of the torch.optim classes whose state is known; any other class is
# counted as AdamW (two), the most the built-in classes keep in the usual settings.
_OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2, "Adagrad": 1}


def optimizer_state_tensors(opt_cfg: Any) -> int:
    """How many parameter-sized fp32 tensors ``ppo.optimizer`` keeps (SGD: its momentum buffer
    only when momentum is set; RMSprop: square average, plus momentum and centred mean)."""
    name = str(opt_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    if name == "SGD":
        return 1 if opt_cfg.get("momentum") else 0
    if name == "RMSprop":
        return 1 + bool(opt_cfg.get("momentum")) + bool(opt_cfg.get("centered"))
    return _OPTIMIZER_STATES.get(name, 2)


def shapes_for(cfg: Any, cuda: bool) -> tuple[ModelShape, RunShape]:
    config = load_model_config(cfg.model)
    model = meta_model(config, bool(cfg.model.trust_remote_code))
    shape = model_shape(config, model)
    first, trainable, kind = _adapter_layout(cfg.adapter, model, shape.num_layers, shape.hidden)
    hw, ppo = cfg.hardware, cfg.ppo
    run = RunShape(
        dtype_bytes=DTYPE_BYTES[hw.dtype],
        quantization=str(cfg.model.quantization),
        rollout_batch=int(ppo.rollout_batch_size),
        rollout_chunk=int(min(hw.rollout_micro_batch_size or ppo.rollout_batch_size, ppo.rollout_batch_size)),
        micro_batch=int(hw.micro_batch_size or ppo.mini_batch_size),
        prompt_tokens=_prompt_tokens(cfg.data),
        response_tokens=int(ppo.max_new_tokens),
        first_adapted=first,
        trainable_params=trainable,
        gradient_checkpointing=bool(hw.gradient_checkpointing),
        prefix_reuse=bool(hw.frozen_prefix_reuse),
        cuda=cuda,
        adapter_kind=kind,
        optimizer_states=optimizer_state_tensors(ppo.optimizer),
    )
    return shape, run


# ----------------------------------------------------------------------------------- knobs

def _halvings(value: int, divides: int | None = None) -> list[int]:
    out, v = [], value // 2
    while v >= 1:
        if divides is None or divides % v == 0:
            out.append(v)
        v //= 2
    return out


def fitting_knobs(model: ModelShape, run: RunShape, budget: int, mini_batch: int) -> list[str]:
    """Overrides that each bring the estimate within ``budget``, cheapest change first; if none
    does alone, the combination of all memory knobs (or a line saying nothing fits)."""
    def fits(r: RunShape) -> int | None:
        total = estimate(model, r).peak_total
        return total if total <= budget else None

    def say(override: str, total: int, note: str = "") -> str:
        return f"{override}  (estimate {total / GIB:.2f} GiB{note})"

    knobs: list[str] = []
    for chunk in _halvings(run.rollout_chunk):
        total = fits(dataclasses.replace(run, rollout_chunk=chunk))
        if total:
            knobs.append(say(f"hardware.rollout_micro_batch_size={chunk}", total))
            break
    for micro in _halvings(run.micro_batch, mini_batch):
        total = fits(dataclasses.replace(run, micro_batch=micro))
        if total:
            knobs.append(say(f"hardware.micro_batch_size={micro}", total))
            break
    if not run.gradient_checkpointing:
        total = fits(dataclasses.replace(run, gradient_checkpointing=True))
        if total:
            knobs.append(say("hardware.gradient_checkpointing=true", total))
    if run.dtype_bytes == 4:
        total = fits(dataclasses.replace(run, dtype_bytes=2))
        if total:
            knobs.append(say("hardware.dtype=bfloat16", total))
    if run.cuda and run.quantization != "nf4":
        total = fits(dataclasses.replace(run, quantization="nf4"))
        if total:
            knobs.append(say("model.quantization=nf4", total, ", needs bitsandbytes"))
    for tokens in _halvings(run.response_tokens):
        total = fits(dataclasses.replace(run, response_tokens=tokens))
        if total:
            knobs.append(say(f"ppo.max_new_tokens={tokens}", total, ", changes what is trained"))
            break
    if knobs:
        return knobs
    smallest = dataclasses.replace(
        run, rollout_chunk=1, micro_batch=1, gradient_checkpointing=True,
        dtype_bytes=2, quantization="nf4" if run.cuda else run.quantization)
    overrides = ("hardware.rollout_micro_batch_size=1 hardware.micro_batch_size=1 "
                 "hardware.gradient_checkpointing=true hardware.dtype=bfloat16"
                 + (" model.quantization=nf4" if run.cuda else ""))
    total = estimate(model, smallest).peak_total
    if total <= budget:
        return [say(overrides, total, ", all together")]
    return [f"nothing fits: even {overrides} needs {total / GIB:.2f} GiB; raise hardware.memory_budget_gb, "
            "use a smaller model or a larger device"]


# ------------------------------------------------------------------------------- the checks

def _is_cuda(device: Any) -> bool:
    return str(getattr(device, "type", device)).startswith("cuda")


def _budget_bytes(cfg) -> int | None:
    gb = cfg.hardware.memory_budget_gb
    return None if gb is None else int(float(gb) * GIB)


def describe(cfg: Any, device: Any) -> tuple[MemoryEstimate, list[str], list[str]]:
    """(estimate, table lines, knobs that would fit the budget; empty when it fits or has no budget)."""
    model, run = shapes_for(cfg, _is_cuda(device))
    est = estimate(model, run)
    budget = _budget_bytes(cfg)
    lines = [f"model: {model.num_layers} layers, hidden {model.hidden}, vocab {model.vocab}, "
             f"{model.params_total / 1e6:.1f} M parameters; {cfg.hardware.dtype}"
             f"{'' if run.quantization == 'none' else ', ' + run.quantization}; rollout {run.rollout_batch} "
             f"in chunks of {run.rollout_chunk}, PPO micro-batch {run.micro_batch}; "
             f"{run.prompt_tokens} + {run.response_tokens} tokens; first adapted layer {run.first_adapted}"
             f"{', gradient checkpointing' if run.gradient_checkpointing else ''}",
             *format_table(est, budget)]
    knobs = []
    if budget is not None and est.peak_total > budget:
        knobs = fitting_knobs(model, run, budget, int(cfg.ppo.mini_batch_size))
    return est, lines, knobs


def check_memory(cfg: Any, device: Any) -> MemoryEstimate | None:
    """Refuse (SetupError), warn or log one line, by ``hardware.memory_check``; nothing to do
    without a budget."""
    mode = cfg.hardware.memory_check
    budget = _budget_bytes(cfg)
    if budget is None or mode == "off":
        return None
    est, lines, knobs = describe(cfg, device)
    if est.peak_total <= budget:
        log.info("memory preflight: estimated peak %.2f GiB (%s) within hardware.memory_budget_gb=%s",
                 est.peak_total / GIB, est.peak_phase, cfg.hardware.memory_budget_gb)
        return est
    message = "\n".join([
        f"memory preflight: the estimated peak {est.peak_total / GIB:.2f} GiB exceeds "
        f"hardware.memory_budget_gb={cfg.hardware.memory_budget_gb}",
        *lines, "what would fit:", *(f"  {k}" for k in knobs),
        "(hardware.memory_check=warn runs anyway; off skips this check)",
    ])
    if mode == "error":
        raise SetupError(message)
    log.warning("%s", message)
    return est


def report(cfg: Any, device: Any) -> str:
    """The text ``+preflight=true`` prints."""
    est, lines, knobs = describe(cfg, device)
    budget = _budget_bytes(cfg)
    if budget is None:
        verdict = "no hardware.memory_budget_gb set: nothing to compare with"
    elif est.peak_total <= budget:
        verdict = f"fits: {est.peak_total / GIB:.2f} GiB of {budget / GIB:.2f} GiB"
    else:
        verdict = "does NOT fit; what would fit:\n" + "\n".join(f"  {k}" for k in knobs)
    return "\n".join([*lines, verdict])
