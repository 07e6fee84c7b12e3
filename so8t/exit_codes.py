"""The process exit codes of SO8T's commands, defined once.

A job script acts on them (``[ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"``), a sweep decides from them
whether the other jobs still run (so8t.sweep), and every command — ``so8t-train``,
``so8t-export``, ``so8t-compare``, ``so8t-verify-resume`` — refuses a bad input with
:attr:`ExitCode.REFUSED`. A stop signal exits with ``128 + its number`` (:func:`signal_exit_code`),
the shell's convention for "ended by signal N".
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "signal_exit_code"]


class ExitCode(IntEnum):
    OK = 0
    # An unexpected failure: the traceback is in train.log (so8t-train) or on stderr.
    FAILED = 1
    # A bad input: an invalid config or override, checkpoints that do not fit this config, a
    # missing device or library, a corrupt or foreign file; said in one message, nothing lost.
    REFUSED = 2
    # Another live process holds the run dir (or took it over during this run).
    LOCKED = 3
    # Checkpoints kept failing (a full disk?): stopped rather than train unprotected.
    CHECKPOINTING = 74
    # Stopped with a checkpoint before max_wall_seconds: re-run (requeue) to continue.
    DEADLINE = 75


def signal_exit_code(signum: int) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1 on Linux."""
    return 128 + int(signum)
