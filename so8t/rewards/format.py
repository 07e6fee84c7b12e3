"""The SO8T answer format and its strict parser.

A well-formed completion is exactly one reasoning block followed by one answer block::

    <think>reasoning, may be empty</think><final>the answer</final>

Surrounding whitespace is ignored, and so is whitespace *between* the two blocks (chat
models like to put a newline there and it changes nothing about the answer). Anything
else is rejected: text before or after, a missing or misspelled tag, a second block, or a
tag nested inside a block. The parser is hand-written (one regular expression plus a tag
check) because no library knows this format, and ``trl.rewards.think_format_reward``
checks only the ``<think>`` part and accepts any trailing text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FINAL_OPEN, FINAL_CLOSE = "<final>", "</final>"
_TAGS = (THINK_OPEN, THINK_CLOSE, FINAL_OPEN, FINAL_CLOSE)

# Non-greedy groups plus ``fullmatch``: a stray tag makes a group swallow it, and the tag
# check below then rejects the text, so duplicates and nesting never slip through.
_PATTERN = re.compile(
    re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE)
    + r"\s*"
    + re.escape(FINAL_OPEN) + r"(.*?)" + re.escape(FINAL_CLOSE),
    re.DOTALL,
)


@dataclass(frozen=True)
class ParsedAnswer:
    """The two blocks of a well-formed completion, each stripped of surrounding whitespace."""

    think: str
    final: str


def parse_answer(text: str) -> ParsedAnswer | None:
    """Parse ``<think>…</think><final>…</final>``; return None unless the format is exact."""
    match = _PATTERN.fullmatch(text.strip())
    if match is None:
        return None
    think, final = match.groups()
    if any(tag in part for part in (think, final) for tag in _TAGS):
        return None
    return ParsedAnswer(think=think.strip(), final=final.strip())
