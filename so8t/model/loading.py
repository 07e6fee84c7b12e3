"""Load the frozen base model and its tokenizer from the ``model`` config group.

Sources:

* ``tiny``  - the embedded pre-trained tiny model in ``so8t/model/assets/tiny`` (no download);
* ``hub``   - a Hugging Face hub id, by default only from the local cache (a ``model.path``
  that is an existing folder is read as a local folder, so a preset for a hub model can be
  pointed at a downloaded copy with ``model.path=/folder``);
* ``local`` - a folder written by ``save_pretrained`` (holds a ``config.json``).

Whatever the source, the caller gets a model that is frozen (eval mode, no gradients), on
the requested device and dtype, and a tokenizer that pads on the left with a pad token
distinct from EOS - the two things PPO for language models relies on. A folder that cannot
hold a usable model (no weights, an architecture transformers does not know, a tokenizer
whose ids do not fit the embeddings) is refused with a message naming the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from so8t.config.schema import ModelKind
from so8t.errors import ModelNotAvailableError
from so8t.model.quantization import check_quantization, quantization_config
from so8t.model.tiny import PAD, TINY_DIR

# Files from_pretrained reads weights from (single file or sharded with an index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

log = logging.getLogger(__name__)

KINDS = tuple(kind.value for kind in ModelKind)


def load_base_model(
    model_cfg: Any,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` as described by ``model_cfg`` (see module docstring).

    ``model_cfg`` needs attributes ``kind``, ``path``, ``local_files_only`` and
    ``trust_remote_code`` (an OmegaConf node or the schema dataclass).
    """
    kind = model_cfg.kind
    path = getattr(model_cfg, "path", None)
    trust_remote_code = bool(getattr(model_cfg, "trust_remote_code", False))
    quantization = str(getattr(model_cfg, "quantization", "none"))
    check_quantization(quantization, device)
    # Straight to the target device (no full CPU copy first), quantised while read if asked.
    placement = dict(device=device, attn_implementation=str(getattr(model_cfg, "attn_implementation", "sdpa")),
                     quantization_config=quantization_config(quantization, dtype))

    if kind == "tiny":
        model, tokenizer = _from_pretrained(TINY_DIR, dtype, True, False, **placement)
        where = "embedded tiny model"
    elif kind == "local" or (kind == "hub" and path and Path(str(path)).expanduser().is_dir()):
        folder = _check_local_folder(path)
        model, tokenizer = _from_folder(folder, dtype, trust_remote_code, **placement)
        where = f"local folder {folder}"
    elif kind == "hub":
        local_files_only = bool(getattr(model_cfg, "local_files_only", True))
        if not path:
            raise ModelNotAvailableError(
                "model.kind=hub needs a hub id: set model.path=<org/name>"
            )
        try:
            model, tokenizer = _from_pretrained(
                path, dtype, local_files_only, trust_remote_code, **placement
            )
        except OSError as err:  # transformers reports a missing cache entry as OSError
            raise ModelNotAvailableError(_hub_message(path, local_files_only, err)) from err
        where = f"hub model {path}"
    else:
        raise ValueError(f"model.kind={str(kind)!r} is not one of {', '.join(KINDS)}")

    _ensure_distinct_pad(model, tokenizer)
    tokenizer.padding_side = "left"  # queries must end where the response starts

    if quantization == "none":
        model.to(device=device, dtype=dtype)  # a no-op after device_map, kept for the resized rows
    model.eval()
    model.requires_grad_(False)  # the base is frozen; adapters add their own parameters
    log.info(
        "loaded %s: %s, %.2fM parameters, %s%s on %s",
        where,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
        "" if quantization == "none" else f" ({quantization} linears)",
        device,
    )
    return model, tokenizer


def _from_pretrained(
    name_or_path: str | Path,
    dtype: torch.dtype,
    local_files_only: bool,
    trust_remote_code: bool,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    quantization_config: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    # Load straight into the target dtype and onto the target device: a 3.8B model loaded as
    # fp32 on the CPU first would need twice the memory of its bf16 copy, on the host.
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, device_map={"": torch.device(device)}, attn_implementation=attn_implementation,
        quantization_config=quantization_config, **kwargs)
    return model, tokenizer


def _from_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, **placement: Any):
    """``_from_pretrained`` on a local folder, with every way the folder can be unusable
    turned into a message that names it and says what is wrong."""
    import json

    from transformers import CONFIG_MAPPING

    where = f"model.path={folder}"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotAvailableError(f"{where}: config.json cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelNotAvailableError(f"{where}: config.json does not hold a JSON object")
    model_type = config.get("model_type")
    if not trust_remote_code and model_type not in CONFIG_MAPPING:
        raise ModelNotAvailableError(
            f"{where}: config.json names model_type={model_type!r}, an architecture this transformers "
            "does not know. Use a newer transformers, or set model.trust_remote_code=true if the folder "
            "ships its own model code and you trust it.")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ModelNotAvailableError(
            f"{where}: the folder has a config.json but no weights (expected one of {', '.join(WEIGHT_FILES)}; "
            f"found {present}). Copy the model's weight files into it, or point model.path at the folder "
            "save_pretrained wrote.")
    try:
        model, tokenizer = _from_pretrained(folder, dtype, True, trust_remote_code, **placement)
    except Exception as exc:  # noqa: BLE001 - safetensors, tokenizers and torch each raise their own types
        # A truncated weights file, a missing tokenizer, shapes that do not match the config ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotAvailableError(f"{where}: the model or its tokenizer cannot be loaded: {first}") from exc
    _check_vocabulary_fits(model, tokenizer, where)
    return model, tokenizer


def _check_vocabulary_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Every id the tokenizer can produce must have an embedding row (a tokenizer from
    another model family would index past the end of the embedding matrix)."""
    rows = model.get_input_embeddings().num_embeddings
    largest = len(tokenizer) - 1
    if largest >= rows:
        raise ModelNotAvailableError(
            f"{where}: the tokenizer has ids up to {largest} but the model has only {rows} embedding rows: "
            "the tokenizer does not belong to this model. Save the model's own tokenizer into the folder.")


def _check_local_folder(path: str | None) -> Path:
    if not path:
        raise ModelNotAvailableError(
            "model.kind=local needs a folder: set model.path=/folder/with/the/model"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelNotAvailableError(
            f"model.path={path}: no such folder. Set model.path to a folder written by "
            "save_pretrained (it holds config.json and the weights)."
        )
    if not (folder / "config.json").is_file():
        raise ModelNotAvailableError(
            f"model.path={path}: the folder has no config.json, so it does not hold a "
            "transformers model. Set model.path to a folder written by save_pretrained."
        )
    return folder


def _hub_message(model_id: str, local_files_only: bool, err: Exception) -> str:
    why = (
        "downloads are off (model.local_files_only=true)"
        if local_files_only
        else "downloads are unavailable here (no network or HF_HUB_OFFLINE=1)"
    )
    return (
        f"model.path={model_id}: the model is not in the local Hugging Face cache and "
        f"{why}. Download it once on a machine with network with `hf download {model_id}` "
        "(and copy the cache, see HF_HOME), or use a folder that holds the model: "
        f"`model=local model.path=/folder/with/the/model`. Cause: {err}"
    )


def _ensure_distinct_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token distinct from EOS, growing the embeddings if needed.

    Many causal-LM tokenizers have no pad token or reuse EOS as pad; then a padded EOS
    cannot be told from a real one. A new ``<pad>`` token needs an embedding row; the new
    rows become part of the frozen base, which is fine because pad positions are masked.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        _set_pad_id(model, tokenizer.pad_token_id)
        return
    tokenizer.add_special_tokens({"pad_token": PAD})
    pad_id = tokenizer.pad_token_id
    rows = model.get_input_embeddings().num_embeddings
    if pad_id >= rows:
        # mean_resizing=False: the mean/covariance init costs time on big vocabularies and
        # is random; instead zero the new rows so reloading gives the same base each time.
        old_rows = rows
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[old_rows:].zero_()
            output = model.get_output_embeddings()
            if output is not None:
                output.weight[old_rows:].zero_()
        log.info(
            "tokenizer had no pad token distinct from eos: added %s (id %d) and resized "
            "the embeddings %d -> %d (new rows are part of the frozen base)",
            PAD, pad_id, old_rows, len(tokenizer),
        )
    else:
        # The vocabulary already had room (e.g. a padded embedding matrix): no resize.
        log.info(
            "tokenizer had no pad token distinct from eos: using %s (id %d)", PAD, pad_id
        )
    _set_pad_id(model, pad_id)


def _set_pad_id(model: PreTrainedModel, pad_id: int) -> None:
    model.config.pad_token_id = pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_id
