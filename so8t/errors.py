"""Errors that refuse a run before it trains, importable without torch.

The recipe catches them around setup and exits with a message instead of a traceback; keeping
them here lets it do so without importing torch first (a completed run is skipped in ~1 s).
"""


class SetupError(RuntimeError):
    """The machine cannot run this config as asked (e.g. CUDA requested but absent)."""


class ModelNotAvailableError(RuntimeError):
    """The configured model cannot be loaded offline; the message says what to set."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be used or written, and going on silently would be wrong."""
