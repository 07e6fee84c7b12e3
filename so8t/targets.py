"""Import what a config's ``_target_`` names, reporting failure as a message rather than a log line.

Hydra's own lookups (``hydra.utils.get_object`` and friends) log every failure at ERROR level
before raising; a config check collects its problems and reports them together, naming the key,
so the lookup runs with that logger quietened and the exception becomes the message.
"""

from __future__ import annotations

import logging
from typing import Any

# Hydra's instantiate arguments besides _target_: they configure the call, they are not arguments
# of the target.
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def locate(path: str) -> Any:
    """The object at the dotted ``path``; raises ImportError with Hydra's reason when there is none."""
    from hydra.utils import get_object

    hydra_log = logging.getLogger("hydra.utils")
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)
    try:
        return get_object(path)
    except Exception as exc:  # noqa: BLE001 - a user's module may raise anything on import
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ImportError(reason or type(exc).__name__) from exc
    finally:
        hydra_log.setLevel(level)


def call_arguments(node: Any) -> dict[str, Any]:
    """The keys of an instantiable node that go to the target as keyword arguments."""
    return {str(k): v for k, v in node.items() if str(k) not in HYDRA_KEYS}
