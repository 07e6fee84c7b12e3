"""``Choice``: the Enum base of every config value picked from a fixed list.

OmegaConf types such a field as an Enum: a value outside the list fails while Hydra composes
the config, naming the key and the valid choices. Each member's name is the value written in
YAML and on the command line, and a member equals that string (``DType.float32 == "float32"``,
also as a dict key), so code that compares with strings, logs or JSON-encodes the value reads
it as the string it was written as.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
