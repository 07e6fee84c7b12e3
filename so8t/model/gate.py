"""Schedule of the SO(8) adapters' residual gate ``g`` (docs/architecture.md).

The trainer asks ``value(step)`` at each step and hands it to ``adapters.set_gate``. The
schedule is a stateful part of the trainer (``state_dict``/``load_state_dict``), so a
resumed run continues on the same curve.

Kinds:

* ``constant``: ``value(step) == target`` for every step (``start`` and ``steps`` are
  ignored; set ``start == target`` in configs to avoid confusion).
* ``sigmoid``: a logistic curve rescaled so that ``value(0) == start`` and
  ``value(steps) == target`` exactly, with ``value`` at ``steps / 2`` equal to the mean of
  the two; ``target`` after ``steps``. ``steepness`` is the logistic slope on the [0, 1]
  progress axis (larger = sharper switch around the midpoint).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from so8t.config.schema import GateKind

logger = logging.getLogger(__name__)

KINDS = tuple(kind.value for kind in GateKind)


class GateSchedule:
    def __init__(
        self,
        kind: str = "constant",
        start: float = 1.0,
        target: float = 1.0,
        steps: int = 0,
        steepness: float = 10.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown gate schedule kind {kind!r}; expected one of {KINDS}")
        if steps < 0:
            raise ValueError(f"gate schedule steps must be >= 0, got {steps}")
        if steepness <= 0:
            raise ValueError(f"gate schedule steepness must be > 0, got {steepness}")
        self.kind = kind
        self.start = float(start)
        self.target = float(target)
        self.steps = int(steps)
        self.steepness = float(steepness)
        self.last_step: int | None = None

    def _logistic(self, x: float) -> float:
        return 1.0 / (1.0 + math.exp(-self.steepness * (x - 0.5)))

    def value(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"gate schedule step must be >= 0, got {step}")
        self.last_step = int(step)
        if self.kind == "constant" or self.steps == 0 or step >= self.steps:
            return self.target
        # Rescale the logistic on [0, 1] so both endpoints are hit exactly (a plain
        # logistic never reaches its asymptotes, so value(0) would not equal start).
        low, high = self._logistic(0.0), self._logistic(1.0)
        fraction = (self._logistic(step / self.steps) - low) / (high - low)
        return self.start + (self.target - self.start) * fraction

    def _config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start": self.start,
            "target": self.target,
            "steps": self.steps,
            "steepness": self.steepness,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the saved schedule; the checkpoint wins over the current config.

        A difference is logged because it means the run was resumed with another gate
        config, which the checkpointed curve overrides (exact continuation first).
        """
        saved = {k: state[k] for k in self._config()}
        if saved != self._config():
            logger.warning(
                "gate schedule from checkpoint %s differs from the configured %s; "
                "continuing with the checkpointed one", saved, self._config(),
            )
        self.__init__(**saved)
        last = state.get("last_step")
        self.last_step = None if last is None else int(last)

    def __repr__(self) -> str:
        return f"GateSchedule({self._config()}, last_step={self.last_step})"
