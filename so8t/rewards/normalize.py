"""Running normalisation and clipping of the total reward (``reward.normalize``, ``reward.clip``).

The statistics are the exact mean and variance of every total reward seen so far, updated
one batch at a time with the Welford/Chan merge (the running estimate of OpenAI baselines'
``RunningMeanStd``) rather than an exponential moving average. Why:

* the estimate converges, so the scale the value function learns settles instead of
  following the policy's progress with a lag set by a decay hyperparameter;
* its whole state is three numbers (count, mean, sum of squared deviations) kept as a
  Python int and two float64 values, which a checkpoint stores and restores exactly, so
  a resumed run normalises bit for bit as the uninterrupted one.

A hand-written merge rather than a library class: torch has no running-moments helper, and
the usual ones (``gym``'s wrappers) would pull in a dependency for ten lines.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Keeps the division finite while only identical rewards have been seen (variance 0).
EPS = 1e-8


class RewardNormalizer:
    """``(r - mean) / std`` over all rewards seen so far, then optional clipping to ``±clip``.

    Calling it with a batch first merges the batch into the statistics, then normalises
    the batch with them. ``enabled=False`` leaves rewards unnormalised and the statistics
    untouched; ``clip`` applies either way (to the normalised reward when enabled, to the
    raw one otherwise), so it can also bound a reward model's unscaled logits.
    """

    def __init__(self, enabled: bool = False, clip: float | None = None):
        if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"reward.clip={clip!r} must be a number > 0 (or null: no clipping)")
        self.enabled = bool(enabled)
        self.clip = None if clip is None else float(clip)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        """Standard deviation of the rewards seen so far (population, 0 before any)."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def __repr__(self) -> str:
        return (
            f"RewardNormalizer(enabled={self.enabled}, clip={self.clip}, count={self.count}, "
            f"mean={self.mean:.4g}, std={self.std:.4g})"
        )

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Update the statistics from ``scores`` (1-d), then return them normalised and clipped."""
        if scores.dim() != 1:
            raise ValueError(f"RewardNormalizer expects a 1-d tensor of rewards, got shape {tuple(scores.shape)}")
        values = scores.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("RewardNormalizer got a non-finite reward")
        out = values
        if self.enabled and values.numel():
            self._merge(values)
            out = (values - self.mean) / math.sqrt(self.m2 / self.count + EPS)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out.to(device=scores.device, dtype=scores.dtype)

    def _merge(self, values: torch.Tensor) -> None:
        # Chan et al.'s parallel form of Welford's update: exact for any batch size, and
        # stable because it never subtracts two large sums of squares.
        n = values.numel()
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain numbers (an int and two floats: exact in any checkpoint)."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict`; a malformed state is refused."""
        expected = {"count", "mean", "m2"}
        if not isinstance(state, dict) or set(state) != expected:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"reward normalizer state must have keys {sorted(expected)}, got {found}")
        count, mean, m2 = state["count"], state["mean"], state["m2"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"reward normalizer state: count must be an int >= 0, got {count!r}")
        for name, value in (("mean", mean), ("m2", m2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward normalizer state: {name} must be a finite number, got {value!r}")
        if m2 < 0:
            raise ValueError(f"reward normalizer state: m2 must be >= 0, got {m2!r}")
        self.count, self.mean, self.m2 = count, float(mean), float(m2)
