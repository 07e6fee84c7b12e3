"""Which config keys shape the result of a run, and names derived from them.

One list of result-neutral keys serves three readers: the default ``run_name`` (so the same
command lands in the same folder whatever the hardware or cadence), sweep job names, and the
config identity stored in checkpoints (so a resumed run may change those keys freely).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Mapping

# Keys (and everything below them) that cannot change what is learned.
NEUTRAL_KEYS = (
    "run_name",
    "experiment_name",
    "sweep_name",
    "max_steps",
    "resume",
    "max_wall_seconds",
    "hardware",
    "output",
    "logger",
    "optimized_metric",
    "checkpoint",
    "paths",
    "hydra",
    # `+preflight=true` only prints the memory estimate and exits.
    "preflight",
)

MAX_NAME_LENGTH = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-]")


def is_neutral(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "@") for k in NEUTRAL_KEYS)


def safe_name(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file-system-safe folder name (Linux and Windows): no separators, no trailing dot."""
    name = _UNSAFE.sub("_", text).strip(". ")
    if len(name) > max_length:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
        name = name[: max_length - 11].rstrip(". ") + "-" + digest
    return name


def name_from_overrides(overrides: Iterable[str], default: str = "default") -> str:
    """Readable name of the result-shaping overrides, independent of their order."""
    kept = sorted(o.lstrip("+") for o in overrides if "=" in o and not is_neutral(o.split("=", 1)[0]))
    return safe_name(",".join(kept)) if kept else default


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_identity(cfg: Any) -> dict[str, Any]:
    """Flat ``{"dotted.key": value}`` of every result-shaping key of a config (a TrainConfig, a
    composed DictConfig or its record, see so8t.config.typed)."""
    from so8t.config.typed import config_record

    container = cfg if isinstance(cfg, Mapping) else config_record(cfg)
    if not isinstance(container, Mapping):
        raise TypeError("config_identity expects a mapping config")
    return {k: v for k, v in flatten(container).items() if not is_neutral(k)}


# Config keys renamed since run folders were first written: old dotted key -> new one. What a
# run recorded (checkpoint manifests, session.json, final/policy.json, export folders) is read
# through upgrade_identity or upgrade_section, so a folder written under the old names still
# resumes, completes and loads. None of these keys changes a value's meaning.
RENAMED_KEYS = {
    "model.source": "model.kind",
    "data.source": "data.kind",
    "checkpoint.policy": "checkpoint.cadence",
}


def upgrade_identity(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded flat ``{"dotted.key": value}`` identity under today's key names."""
    upgraded = dict(flat)
    for old, new in RENAMED_KEYS.items():
        if old in upgraded and new not in upgraded:
            upgraded[new] = upgraded.pop(old)
    return upgraded


def upgrade_section(group: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded config section (``{"source": "tiny", ...}`` of group ``model``) under today's key names."""
    prefix = f"{group}."
    return {key[len(prefix):]: value for key, value in
            upgrade_identity({prefix + key: value for key, value in section.items()}).items()}
