"""Errors of the export: each one is a bad input the CLI reports with exit code 2."""


class ExportError(RuntimeError):
    """Bad input to the export (a missing or damaged source, an existing output …)."""


class FoldError(ExportError):
    """The SO(8) rotations cannot be merged exactly into this model; the message says why."""
