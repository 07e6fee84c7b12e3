"""Built-in reward terms.

Every term follows the calling convention documented in :mod:`so8t.rewards`: it is called
with keyword arguments only and returns one float (or None) per completion. Options a term
takes (the keys of ``reward.terms.<name>`` beside its weight) are keyword parameters after the
common ones.
"""

from __future__ import annotations

import logging
from typing import Callable

from so8t.rewards.format import parse_answer
from so8t.rewards.reward_model import RewardModelTerm

log = logging.getLogger(__name__)

# Arguments every term receives on every call; a term's options may not reuse these names.
STANDARD_ARGS = (
    "completions",
    "prompts",
    "messages",
    "references",
    "solution",
    "eos",
    "num_tokens",
    "max_new_tokens",
    "messages",
)


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion is exactly ``<think>…</think><final>…</final>``, else 0.0."""
    return [1.0 if parse_answer(text) is not None else 0.0 for text in completions]


def exact_match_reward(
    completions: list[str], references: list[str | None], **kwargs
) -> list[float | None]:
    """1.0 when the parsed final answer equals the reference (both stripped), else 0.0.

    An unparsable completion scores 0.0. A prompt without a reference scores None: there
    is nothing to be right about, so it adds nothing to the total and is left out of the
    term's logged mean instead of dragging the accuracy towards zero (the same convention
    as ``trl.rewards.accuracy_reward`` for an unparsable gold answer).
    """
    scores: list[float | None] = []
    for text, reference in zip(completions, references, strict=True):
        if reference is None:
            scores.append(None)
            continue
        parsed = parse_answer(text)
        scores.append(1.0 if parsed is not None and parsed.final == reference.strip() else 0.0)
    return scores


def eos_reward(completions: list[str], eos: list[bool], **kwargs) -> list[float]:
    """1.0 when the response ended with an EOS token, 0.0 when it hit the length limit."""
    return [1.0 if ended else 0.0 for ended in eos]


def length_penalty(
    completions: list[str],
    num_tokens: list[int],
    max_new_tokens: int,
    start_fraction: float = 0.0,
    **kwargs,
) -> list[float]:
    """A penalty in [-1, 0] that grows linearly with the response length.

    With ``f = num_tokens / max_new_tokens`` the penalty is 0 up to ``f = start_fraction``
    and falls linearly to -1 at ``f = 1`` (the longest response the rollout allows).
    """
    problems = check_length_options({"start_fraction": start_fraction})
    if problems:
        raise ValueError("; ".join(problems))
    if max_new_tokens <= 0:
        raise ValueError(f"length reward: max_new_tokens must be positive, got {max_new_tokens}")
    span = 1.0 - start_fraction
    penalties = []
    for count in num_tokens:
        excess = count / max_new_tokens - start_fraction
        penalties.append(-min(1.0, max(0.0, excess / span)))
    return penalties


def check_length_options(options: dict) -> list[str]:
    """Problems with the ``length`` term's options, checked before anything runs."""
    start = options.get("start_fraction", 0.0)
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start < 1.0:
        return [f"start_fraction must be a number in [0, 1), got {start!r}"]
    return []


BUILTIN_TERMS: dict[str, Callable[..., list]] = {
    "format": format_reward,
    "exact_match": exact_match_reward,
    "eos": eos_reward,
    "length": length_penalty,
}

# Built-in terms that hold a model: classes built once per run with the term's options; the
# instance is then called like a function. Their options are checked by their ``check_options``.
BUILTIN_CLASSES: dict[str, type] = {
    "reward_model": RewardModelTerm,
}

# Option checks for built-ins whose option values can be wrong (names are checked for all).
BUILTIN_OPTION_CHECKS: dict[str, Callable[[dict], list[str]]] = {
    "length": check_length_options,
}
