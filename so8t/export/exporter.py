"""Turn a trained policy into a standard Hugging Face folder (see :mod:`so8t.export`)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from so8t.export.atomic_dir import check_output, write_dir_atomically
from so8t.export.card import CardFacts, base_model_name, render_card
from so8t.export.errors import ExportError
from so8t.export.options import DTYPE_NAMES, LAYOUTS
from so8t.export.source import EXPORT_META_FILE, TrainedPolicy, load_trained_policy, resolve_source

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
CARD_FILE = "README.md"
FORMAT_NAME = "so8t-export"
FORMAT_VERSION = 1
# The merged model must reproduce the adapted policy: on the probe batch, in fp32, the
# largest logit difference may be this fraction of the largest logit (measured: ~1e-7).
CHECK_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    out: Path
    layout: str
    check: dict | None


def export_policy(source: str | Path, out: str | Path, *, layout: str = "auto", dtype: str = "float32",
                  force: bool = False, device: str = "cpu", command: str | None = None) -> ExportResult:
    """Export SOURCE (run folder, ``final/`` or checkpoint) to the folder ``out``.

    ``layout``: ``peft`` (LoRA only: a PEFT adapter folder), ``merged`` (a full model that
    ``AutoModelForCausalLM.from_pretrained`` loads; SO(8) rotations are folded in exactly,
    LoRA is merged with ``merge_and_unload``) or ``auto`` (``peft`` for LoRA, ``merged`` for
    SO(8), which has no adapter format other tools read). ``dtype`` is that of the written
    weights; the work is done in fp32. Raises ExportError for every bad input.
    """
    if layout not in LAYOUTS:
        raise ExportError(f"--format {layout!r} is not one of {', '.join(LAYOUTS)}")
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    _check_device(device)
    _kind, folder = resolve_source(source)
    out = check_output(Path(out), force, protected=folder)  # fail before the slow part
    trained = load_trained_policy(folder, device)
    kind = trained.adapter_cfg.get("kind")
    layout = _choose_layout(kind, layout)

    check = None
    if kind == "so8":
        check = _merge_so8(trained)
    elif layout == "merged":
        check = _merge_lora(trained)
    model = _peft_model(trained) if layout == "peft" else trained.policy.base
    torch_dtype = getattr(torch, dtype)
    model.to(torch_dtype)
    trained.policy.base.config.dtype = torch_dtype
    facts = CardFacts(
        layout=layout, dtype=dtype, architecture=type(trained.policy.base).__name__,
        base_model=base_model_name(trained.model_cfg),
        export_command=command or f"so8t-export {source} --out {out}", check=check,
    )

    def fill(tmp: Path) -> None:
        if layout == "peft":
            # save_embedding_layers=False: the base's own embedding/lm_head matrices are part of
            # the base model, not of the adapter (as in the run's checkpoints).
            model.save_pretrained(str(tmp), save_embedding_layers=False)
            _generation_config(trained).save_pretrained(str(tmp))
        else:
            model.generation_config = _generation_config(trained)
            model.save_pretrained(str(tmp))
        trained.tokenizer.save_pretrained(str(tmp))
        _save_value_head(trained.policy.value_head, tmp / VALUE_HEAD_FILE)
        meta = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": layout, "adapter_kind": kind,
            "dtype": dtype, "model": trained.model_cfg, "adapter": trained.adapter_cfg, "gate": trained.gate,
            "step": trained.step, "source": str(trained.source.resolve()), "source_kind": trained.source_kind,
            "value_head": VALUE_HEAD_FILE, "check": check,
            "stop_token_ids": trained.stop_ids, "prompting": trained.prompting,
        }
        (tmp / EXPORT_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # Written last: PEFT's save_pretrained writes a README.md of its own.
        (tmp / CARD_FILE).write_text(render_card(trained, facts, out.name), encoding="utf-8")

    try:
        write_dir_atomically(out, fill, force=force)
    except OSError as exc:
        raise ExportError(f"cannot write the export to {out}: {exc} (nothing was written there)") from exc
    log.info("exported %s (%s, %s) to %s", trained.source, layout, dtype, out)
    return ExportResult(out=out, layout=layout, check=check)


def _check_device(device: str) -> None:
    from so8t.build import resolve_device
    from so8t.errors import SetupError

    try:
        resolve_device(device)
    except (SetupError, RuntimeError) as exc:  # RuntimeError: torch cannot parse the name
        raise ExportError(f"--device {device}: {exc}") from exc


def _choose_layout(kind: str | None, layout: str) -> str:
    if kind == "so8":
        if layout == "peft":
            raise ExportError("SO(8) rotations have no PEFT adapter format; export them merged "
                              "(--merge, the default for SO(8) runs)")
        return "merged"
    if kind == "lora":
        return "peft" if layout == "auto" else layout
    raise ExportError(f"cannot export a policy with adapter kind {kind!r} (expected so8 or lora)")


def _merge_so8(trained: TrainedPolicy) -> dict:
    from so8t.export.fold import check_foldable, fold_rotations

    policy = trained.policy
    check_foldable(policy.base, trained.gate)  # before touching the model: refuse cleanly
    reference = _probe(policy, trained.tokenizer)
    with torch.no_grad():
        rotations = {i: r.detach() for i, r in policy.adapter.rotations_by_layer().items()}
    policy.adapter.remove()
    policy.adapter = None
    fold_rotations(policy.base, rotations, trained.gate, final_readers=[policy.value_head])
    return _compare(reference, _probe(policy, trained.tokenizer), "merging the SO(8) rotations")


def _merge_lora(trained: TrainedPolicy) -> dict:
    policy = trained.policy
    reference = _probe(policy, trained.tokenizer)
    merged = policy.adapter.peft_model.merge_and_unload()
    policy.base, policy.adapter = merged, None
    return _compare(reference, _probe(policy, trained.tokenizer), "merging LoRA")


def _peft_model(trained: TrainedPolicy):
    return trained.policy.adapter.peft_model


def _probe(policy, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and values of the policy on a fixed batch of token ids (one row left-padded)."""
    vocab = policy.base.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    if tokenizer.pad_token_id is not None:
        ids[1, :4] = tokenizer.pad_token_id
    device = next(policy.base.parameters()).device
    with torch.no_grad():
        out = policy(ids.to(device), mask.to(device))
    keep = mask.bool().to(device)
    return out.logits[keep].float().cpu(), out.values[keep].float().cpu()


def _compare(reference, merged, what: str) -> dict:
    logits = (reference[0] - merged[0]).abs().max().item()
    values = (reference[1] - merged[1]).abs().max().item()
    scale = max(1.0, reference[0].abs().max().item())
    if not logits <= CHECK_TOLERANCE * scale:
        raise ExportError(f"{what} did not reproduce the policy: max |Δ logits| = {logits:.3g} on a probe "
                          f"batch (allowed {CHECK_TOLERANCE * scale:.3g}); nothing was written")
    log.info("%s: max |Δ logits| %.3g, max |Δ values| %.3g on the probe batch", what, logits, values)
    return {"max_abs_logits": logits, "max_abs_values": values}


def _generation_config(trained: TrainedPolicy):
    """The base's generation config with every stop id of training (its own, the tokenizer's
    EOS and ``ppo.stop_token_ids``) and the pad token."""
    from transformers import GenerationConfig

    base = trained.policy.base
    config = getattr(base, "generation_config", None)
    config = copy.deepcopy(config) if config is not None else GenerationConfig.from_model_config(base.config)
    eos = config.eos_token_id
    stop = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    stop += [i for i in trained.stop_ids if i not in stop]  # the model's own order first
    config.eos_token_id = stop[0] if len(stop) == 1 else (stop or None)
    config.pad_token_id = trained.tokenizer.pad_token_id
    return config


def _save_value_head(head: torch.nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: t.detach().float().cpu().contiguous() for name, t in head.state_dict().items()}, str(path))
