"""Prompt datasets: synthetic arithmetic and JSON-lines files.

``build_prompts(data_cfg, tokenizer)`` returns the whole prompt list up front; prompt sets
for PPO are small, and a fixed list is what makes the sampler's position (an index into
it) enough to resume exactly.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCES = ("arithmetic", "jsonl")


@dataclass(frozen=True)
class Prompt:
    """One prompt, ready to tokenize, with the reference answer reward terms may compare to."""

    text: str
    reference: str | None


def _get(node: Any, key: str, default: Any = None) -> Any:
    """Read a key from a DictConfig, a plain dict or a dataclass alike."""
    if isinstance(node, Mapping):
        return node.get(key, default)
    return getattr(node, key, default)


def build_prompts(data_cfg: Any, tokenizer: Any = None) -> list[Prompt]:
    """Build the prompt list described by ``data_cfg`` (see ``so8t.config.schema``)."""
    source = _get(data_cfg, "source")
    if source == "arithmetic":
        prompts = arithmetic_prompts(data_cfg)
    elif source == "jsonl":
        prompts = jsonl_prompts(data_cfg, tokenizer)
    else:
        raise ValueError(f"data.source: unknown prompt source {source!r} (choose from {', '.join(SOURCES)})")
    log.info("data: %d prompts from source %r", len(prompts), source)
    return prompts


# --------------------------------------------------------------------------- arithmetic


def arithmetic_prompts(data_cfg: Any) -> list[Prompt]:
    """``num_prompts`` distinct questions ``"a+b="`` with reference ``str(a + b)``.

    Pairs are ordered, so ``3+4=`` and ``4+3=`` are different prompts. When ``num_prompts``
    is at least the number of pairs, every pair is used once, in a seeded shuffled order.
    """
    low = _get(data_cfg, "min_operand", 0)
    high = _get(data_cfg, "max_operand", 9)
    num_prompts = _get(data_cfg, "num_prompts", 100)
    seed = _get(data_cfg, "seed", 0)
    if low < 0:
        # The tiny model's tokenizer has no minus sign, and "3+-2=" is not a question anyone means.
        raise ValueError(f"data.min_operand must be >= 0, got {low}")
    if high < low:
        raise ValueError(f"data.max_operand ({high}) must be >= data.min_operand ({low})")
    if num_prompts < 1:
        raise ValueError(f"data.num_prompts must be >= 1, got {num_prompts}")

    width = high - low + 1
    num_pairs = width * width
    if num_prompts > num_pairs:
        log.info(
            "data.num_prompts=%d exceeds the %d distinct pairs of operands %d..%d; using all pairs",
            num_prompts, num_pairs, low, high,
        )
    # A private Random keeps the global RNG untouched. ``sample`` over a range draws distinct
    # pair numbers without building the full pair list, and with k == len it is a shuffle.
    rng = random.Random(seed)
    picks = rng.sample(range(num_pairs), min(num_prompts, num_pairs))
    prompts = []
    for pick in picks:
        a, b = low + pick // width, low + pick % width
        prompts.append(Prompt(text=f"{a}+{b}=", reference=str(a + b)))
    return prompts


# --------------------------------------------------------------------------- jsonl


def _chat_template_mode(value: Any) -> str:
    # OmegaConf turns a YAML boolean in a str field into "True"/"False", so compare loosely.
    mode = str(value).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"data.chat_template must be auto, true or false, got {value!r}")
    return mode


def jsonl_prompts(data_cfg: Any, tokenizer: Any = None) -> list[Prompt]:
    """Read prompts from a UTF-8 JSON-lines file, one object per line (blank lines skipped)."""
    path_value = _get(data_cfg, "path")
    if not path_value:
        raise ValueError("data.path: set the path of the JSON-lines prompt file")
    path = Path(str(path_value)).expanduser()
    prompt_field = _get(data_cfg, "prompt_field", "prompt")
    reference_field = _get(data_cfg, "reference_field")
    system_field = _get(data_cfg, "system_field")
    max_prompt_tokens = _get(data_cfg, "max_prompt_tokens")
    mode = _chat_template_mode(_get(data_cfg, "chat_template", "auto"))

    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if mode == "true" and not has_template:
        what = "no tokenizer was given" if tokenizer is None else "the tokenizer has no chat template"
        raise ValueError(f"data.chat_template=true but {what}; use auto or false")
    use_template = has_template and mode in ("auto", "true")

    if not path.is_file():
        raise FileNotFoundError(f"data.path: prompt file not found: {path}")

    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")

            if prompt_field not in row:
                raise ValueError(
                    f"{where}: missing prompt field {prompt_field!r} (data.prompt_field); "
                    f"fields present: {', '.join(sorted(row)) or 'none'}"
                )
            prompt = _text_field(row, prompt_field, where, "data.prompt_field")
            if prompt is None:
                raise ValueError(f"{where}: prompt field {prompt_field!r} (data.prompt_field) is null")
            reference = _text_field(row, reference_field, where, "data.reference_field")
            system = _text_field(row, system_field, where, "data.system_field")

            if use_template:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}
                ]
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = f"{system}\n{prompt}" if system else prompt

            if tokenizer is not None and max_prompt_tokens is not None:
                # Rendered templates already hold their special tokens, so don't add them again.
                count = len(tokenizer(text, add_special_tokens=not use_template)["input_ids"])
                if count > max_prompt_tokens:
                    raise ValueError(
                        f"{where}: prompt is {count} tokens, "
                        f"longer than data.max_prompt_tokens={max_prompt_tokens}"
                    )
            prompts.append(Prompt(text=text, reference=reference))

    if not prompts:
        raise ValueError(f"data.path: {path} holds no prompts")
    return prompts


def _text_field(row: dict, field_name: str | None, where: str, key: str) -> str | None:
    """The row's value for an optional field: None when unset, missing or null.

    Numbers become strings because answers such as ``42`` are natural to write as JSON
    numbers; anything else that is not a string is an error.
    """
    if not field_name:
        return None
    value = row.get(field_name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field {field_name!r} ({key}) must be a string, got {type(value).__name__}")
