"""SO8T: PPO for causal LMs with SO(8) residual rotation adapters."""

__version__ = "0.1.0"


def load_policy(path, device: str = "cpu", dtype: str = "float32"):
    """Rebuild a trained policy from a run's ``final/`` folder or a ``so8t-export`` folder
    (see so8t.model.export)."""
    from so8t.model.export import load_policy as _load_policy

    return _load_policy(path, device=device, dtype=dtype)


__all__ = ["load_policy", "__version__"]
