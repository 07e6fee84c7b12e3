"""The ``reward_model`` term: scores from an ``AutoModelForSequenceClassification``.

Configured like any term (``weight`` and the options beside it); its options are the keyword arguments
of :class:`RewardModelTerm`. The model and its tokenizer are loaded once, when the reward is
built for a run; config validation only checks the options (:func:`check_options`), so a
wrong option is reported in seconds without loading anything.

What the model reads, for each completion:

* when the reward model's tokenizer has a chat template and the prompt's chat messages are
  known (the ``messages`` argument), the template rendered over
  ``messages + [{"role": "assistant", "content": completion}]`` - the reward model sees the
  conversation in its own format, whatever the policy's template was;
* otherwise the prompt text (as the policy was given it) followed by the completion, with
  the special tokens (BOS ...) the reward tokenizer adds.

Texts longer than ``max_length`` tokens keep their *last* ``max_length`` tokens: the score is
read at the last token and the completion is what is being judged.

The score is the logit ``label_index`` (default 0: the single logit of the usual reward
model). Sequences are padded on the right whatever the saved tokenizer says, so each text is
scored exactly as on its own (causal models never attend to later pads) and the score is
read at the last real token; a tokenizer without a pad token pads with the model config's
pad id, else with EOS (the convention most reward models were trained with), else with a
new ``<pad>`` token.

torch and transformers are imported when a term is built, not when this module is: config
validation imports it and must stay fast.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from so8t.errors import ModelNotAvailableError, SetupError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
# A hub id is "name" or "org/name"; anything else that is not an existing folder is a wrong path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# Option name -> default; ``path`` has none and must be set.
DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "batch_size": 8,
    "max_length": 1024,
    "label_index": 0,
    "local_files_only": True,
    "trust_remote_code": False,
}
OPTIONS = ("path",) + tuple(DEFAULTS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(options: dict[str, Any]) -> list[str]:
    """Problems with the options, without loading anything; each message starts with the option."""
    problems = [
        f"{name}: unknown option of the reward model term (options: {', '.join(OPTIONS)})"
        for name in sorted(set(options) - set(OPTIONS))
    ]
    path = options.get("path")
    if not isinstance(path, str) or not path.strip():
        problems.append(
            f"path must be set to a folder written by save_pretrained or a hub id in the local "
            f"cache, got {path!r}"
        )
    opts = {**DEFAULTS, **options}
    if not isinstance(opts["device"], str) or not _DEVICE.fullmatch(opts["device"]):
        problems.append(f"device={opts['device']!r} must be cpu, cuda, cuda:N or auto")
    if opts["dtype"] not in DTYPES:
        problems.append(f"dtype={opts['dtype']!r} must be one of {list(DTYPES)}")
    for name in ("batch_size", "max_length"):
        if not _is_int(opts[name]) or opts[name] < 1:
            problems.append(f"{name}={opts[name]!r} must be an integer >= 1")
    if not _is_int(opts["label_index"]) or opts["label_index"] < 0:
        problems.append(f"label_index={opts['label_index']!r} must be an integer >= 0")
    for name in ("local_files_only", "trust_remote_code"):
        if not isinstance(opts[name], bool):
            problems.append(f"{name}={opts[name]!r} must be true or false")
    return problems


class RewardModelTerm:
    """A reward term backed by a sequence-classification model (see the module docstring).

    Errors raised while building name the option they concern at the start of the message
    (``path=…: …``); :func:`so8t.rewards.build_reward` prefixes the term's config key.
    """

    # Validation calls this instead of building the term (see so8t.rewards).
    check_options = staticmethod(check_options)

    def __init__(
        self,
        path: str,
        device: str = DEFAULTS["device"],
        dtype: str = DEFAULTS["dtype"],
        batch_size: int = DEFAULTS["batch_size"],
        max_length: int = DEFAULTS["max_length"],
        label_index: int = DEFAULTS["label_index"],
        local_files_only: bool = DEFAULTS["local_files_only"],
        trust_remote_code: bool = DEFAULTS["trust_remote_code"],
    ):
        problems = check_options({
            "path": path, "device": device, "dtype": dtype, "batch_size": batch_size,
            "max_length": max_length, "label_index": label_index,
            "local_files_only": local_files_only, "trust_remote_code": trust_remote_code,
        })
        if problems:
            raise SetupError("; ".join(problems))
        import torch

        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.label_index = label_index
        self.device = _resolve_device(device)
        self.dtype = getattr(torch, dtype)
        self.model, self.tokenizer = _load(path, self.dtype, local_files_only, trust_remote_code)
        num_labels = self.model.config.num_labels
        if label_index >= num_labels:
            raise SetupError(
                f"label_index={label_index} but the reward model at {path} has {num_labels} "
                f"label(s): use 0..{num_labels - 1}"
            )
        self.pad_id = _ensure_pad(self.model, self.tokenizer)
        self.model.to(device=self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        log.info(
            "reward model %s: %s, %.2fM parameters, %s on %s, %s",
            path, type(self.model).__name__, sum(p.numel() for p in self.model.parameters()) / 1e6,
            dtype, self.device,
            "chat template" if self.has_chat_template else "no chat template (prompt + completion)",
        )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def __repr__(self) -> str:
        return f"RewardModelTerm({self.path!r}, device={self.device}, dtype={self.dtype})"

    def render(
        self, prompts: list[str], completions: list[str], messages: list[Any] | None = None
    ) -> list[tuple[str, bool]]:
        """The text the reward model scores for each completion, and whether it came from the
        chat template (then the tokenizer adds no special tokens of its own: the template has them)."""
        rendered = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            chat = messages[i] if messages is not None else None
            if chat is not None and self.has_chat_template:
                conversation = list(chat) + [{"role": "assistant", "content": completion}]
                rendered.append((self.tokenizer.apply_chat_template(conversation, tokenize=False), True))
            else:
                rendered.append((prompt + completion, False))
        return rendered

    def __call__(
        self,
        completions: list[str],
        prompts: list[str],
        messages: list[Any] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        import torch

        encoded = [self._encode(text, templated) for text, templated in self.render(prompts, completions, messages)]
        scores: list[float] = [0.0] * len(encoded)
        # Similar lengths batched together waste less compute on padding; the scores do not
        # depend on the grouping.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                input_ids, attention_mask = self._pad([encoded[i] for i in chunk])
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                for i, value in zip(chunk, logits[:, self.label_index].float().tolist(), strict=True):
                    scores[i] = value
        return scores

    def _encode(self, text: str, templated: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if len(ids) > self.max_length:
            log.debug("reward model input of %d tokens cut to its last %d", len(ids), self.max_length)
            ids = ids[-self.max_length:]
        return ids

    def _pad(self, sequences: list[list[int]]):
        # Right padding by hand: the texts were encoded one by one (templated ones without
        # added special tokens), and the padding side must not follow the saved tokenizer.
        import torch

        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError(f"device={name} but CUDA is not available on this machine; use device=cpu")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise SetupError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def _load(path: str, dtype, local_files_only: bool, trust_remote_code: bool):
    """Load (model, tokenizer) from a folder or the hub cache, or say what is wrong."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelNotAvailableError(f"path={path}: not a folder. Set it to a folder written by save_pretrained.")
        if not (folder / "config.json").is_file():
            raise ModelNotAvailableError(
                f"path={path}: the folder has no config.json, so it does not hold a transformers "
                "model. Set it to a folder written by save_pretrained."
            )
        source, where, from_hub = str(folder), f"the folder {folder}", False
    elif _HUB_ID.fullmatch(path):
        source, where, from_hub = path, f"the hub model {path}", True
    else:
        raise ModelNotAvailableError(
            f"path={path}: no such folder. Set it to a folder written by save_pretrained "
            "(config.json, tokenizer and weights) or to a hub id in the local cache."
        )
    kwargs = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=dtype, output_loading_info=True, **kwargs
        )
    except OSError as err:  # transformers reports missing files and cache misses as OSError
        if from_hub:
            raise ModelNotAvailableError(_hub_message(path, local_files_only, err)) from err
        raise ModelNotAvailableError(f"path={path}: cannot load a reward model from {where}: {err}") from err
    except (ValueError, KeyError) as err:  # an architecture transformers does not know, a bad config
        raise ModelNotAvailableError(
            f"path={path}: {where} does not hold a sequence-classification model transformers can "
            f"load: {err}"
        ) from err
    # A causal-LM checkpoint loads as a classifier with a *random* head: refuse it, or the
    # reward would be noise.
    prefix = getattr(model, "base_model_prefix", "") + "."
    head = [key for key in info.get("missing_keys", ()) if not key.startswith(prefix)]
    if head:
        raise ModelNotAvailableError(
            f"path={path}: {where} has no trained classification head (missing "
            f"{', '.join(sorted(head)[:4])}); it is not a reward model"
        )
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelNotAvailableError(
            f"path={path}: the tokenizer of {where} has {len(tokenizer)} tokens but the model "
            f"only {rows} embeddings; the tokenizer does not belong to this model"
        )
    return model, tokenizer


def _hub_message(model_id: str, local_files_only: bool, err: Exception) -> str:
    why = (
        "downloads are off (local_files_only=true)"
        if local_files_only
        else "downloads are unavailable here (no network or HF_HUB_OFFLINE=1)"
    )
    return (
        f"path={model_id}: no such folder, and the model is not in the local Hugging Face cache "
        f"and {why}. Download it once on a machine with network with `hf download {model_id}` "
        "(and copy the cache, see HF_HOME), or set the path to a folder that holds the model. "
        f"Cause: {err}"
    )


def _ensure_pad(model, tokenizer) -> int:
    """The pad id to use, set on both tokenizer and model config (the model needs it to find
    the last real token of each padded row)."""
    if tokenizer.pad_token_id is None:
        config_pad = model.config.get_text_config().pad_token_id
        if config_pad is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config_pad)
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                # The new row is never read: pads are masked and come after the last real token.
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        log.info("reward model tokenizer had no pad token: padding with %r", tokenizer.pad_token)
    pad_id = tokenizer.pad_token_id
    model.config.pad_token_id = pad_id
    model.config.get_text_config().pad_token_id = pad_id
    return pad_id
