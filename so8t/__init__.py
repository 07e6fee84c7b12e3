"""SO8T: PPO for causal LMs with SO(8) residual rotation adapters."""

__version__ = "0.1.0"


def load_policy(path, device: str = "cpu", dtype: str = "float32", *, trust_remote_code: bool = False,
                local_files_only: bool = True):
    """Rebuild a trained policy from a run's ``final/`` folder or a ``so8t-export`` folder (see
    so8t.final_policy). Running the model repository's code or downloading the base model happen
    only when asked for here."""
    from so8t.final_policy import load_policy as _load_policy

    return _load_policy(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                        local_files_only=local_files_only)


__all__ = ["load_policy", "__version__"]
