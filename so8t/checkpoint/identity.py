"""Is a checkpoint compatible with the config a run is resumed with?

Identities are flat ``{"dotted.key": value}`` dicts (see ``so8t.config.identity.config_identity``,
which already drops result-neutral keys: hardware, logging, checkpoint cadence, ``max_steps``,
``resume``, run and experiment names, paths). The caller removes such keys before passing an
identity here; anything left that differs is at least worth a warning.

Rule: a differing key that matches ``shape_keys`` (glob patterns) is refused, because it
changes what the saved tensors mean or their shapes: the model (base weights, architecture,
value head) and the adapter (kind, layers, rank, targets, gate). Every other differing key
(learning rate, PPO knobs, reward weights, data, seed) is accepted with a warning: the
state still loads, and the user asked for the change. A key present on one side only counts
as differing. A trainer that knows more keys which change the structure of saved state (an
optimizer or schedule *kind*) passes them in ``shape_keys``.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

__all__ = ["DEFAULT_SHAPE_KEYS", "SHAPE_EXEMPT_KEYS", "ABSENT", "compare_identity", "describe_differences"]

DEFAULT_SHAPE_KEYS: tuple[str, ...] = ("model.*", "adapter.*")
# Under model.* but cannot change the loaded weights: only where they are looked up.
SHAPE_EXEMPT_KEYS: tuple[str, ...] = ("model.local_files_only",)

ABSENT = "<absent>"


def compare_identity(
    saved: Mapping[str, Any],
    new: Mapping[str, Any],
    shape_keys: Iterable[str] = DEFAULT_SHAPE_KEYS,
    exempt_keys: Iterable[str] = SHAPE_EXEMPT_KEYS,
) -> tuple[list[str], list[str]]:
    """``(refused_keys, changed_keys)``: differing keys that forbid a resume, and the others."""
    shape_keys, exempt_keys = tuple(shape_keys), tuple(exempt_keys)
    refused: list[str] = []
    changed: list[str] = []
    for key in sorted(set(saved) | set(new)):
        if _normalise(saved.get(key, ABSENT)) == _normalise(new.get(key, ABSENT)):
            continue
        is_shape = any(fnmatchcase(key, p) for p in shape_keys) and not any(fnmatchcase(key, p) for p in exempt_keys)
        (refused if is_shape else changed).append(key)
    return refused, changed


def describe_differences(keys: Iterable[str], saved: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}: checkpoint {saved.get(k, ABSENT)!r} -> now {new.get(k, ABSENT)!r}" for k in keys)


def _normalise(value: Any) -> Any:
    # The saved side went through JSON (tuples became lists); put the new side through too.
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):
        return repr(value)
