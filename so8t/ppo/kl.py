"""KL coefficient controllers (fixed, or adaptive towards a target KL)."""

from __future__ import annotations


class FixedKLController:
    def __init__(self, init_coef: float):
        self.value = float(init_coef)

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller of Ziegler et al. (2019): beta moves so the KL tracks a target."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        super().__init__(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_episodes / self.horizon


def build_kl_controller(kl_cfg) -> FixedKLController:
    if kl_cfg.kind == "fixed":
        return FixedKLController(kl_cfg.init_coef)
    if kl_cfg.kind == "adaptive":
        return AdaptiveKLController(kl_cfg.init_coef, kl_cfg.target, kl_cfg.horizon)
    raise ValueError(f"ppo.kl.kind={kl_cfg.kind!r} must be fixed or adaptive")
