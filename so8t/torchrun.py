"""``so8t-torchrun``: PyTorch's torchrun, ending with the group's exit status.

It is torchrun itself — ``torch.distributed.run.main`` with the same arguments, the same elastic
agent, rendezvous and signal forwarding — and changes two things. First, how the launcher ends.
Plain torchrun turns every outcome but success into status 1 (its agent raises a signal it
received as an exception, and it raises when any rank fails), so a job script cannot tell a run
stopped by SIGTERM and saved (143, requeue it) from the deadline (75, requeue it) from a refused
config (2, do not) from a crash (1). Here, on each node:

* the launcher got signal N and forwarded it to its ranks, which stopped: ``128 + N``; 137 when a
  rank did not stop within torchrun's shutdown timeout and was killed. The ranks' own statuses
  do not reach the launcher on this path: whether each saved is in rank 0's ``session.json``
  (``attempts[-1]``) and ``train.log``;
* ranks failed: the status of the rank that failed first (:func:`root_cause`), a rank killed by
  signal N counting as ``128 + N`` — 128+N when every rank stopped on signal N sent to one of
  them, 75 at the deadline, 2 for a refused input, 137 after ``kill -9`` of a rank; torchrun's
  failure summary is printed, without the traceback;
* otherwise torchrun's own status.

Second, SIGUSR1 (what SLURM's ``--signal=USR1@…`` sends before a time limit) is forwarded to
the ranks like SIGTERM, unless ``--signals-to-handle`` says otherwise: plain torchrun does not
handle it, so the signal would end the launcher and leave its ranks running unsupervised.

Wrapping rather than reimplementing: the launcher stays PyTorch's (``accelerate launch`` calls the
same ``torch.distributed.run`` entry); only its default signal list and how it ends are touched.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from so8t.exit_codes import signal_exit_code

__all__ = ["main", "root_cause", "status_of_failure"]

# torchrun's default list of signals it forwards to the ranks, plus SLURM's warning signal.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT" + (",SIGUSR1" if hasattr(signal, "SIGUSR1") else "")
KILLED = signal_exit_code(9)  # 137: a rank SIGKILLed by the launcher after its shutdown timeout


def status_of_failure(exitcode: int) -> int:
    """A worker's exit status as the shell reports it: ``128 + N`` for one killed by signal N
    (torch records those as ``-N``)."""
    return signal_exit_code(-exitcode) if exitcode < 0 else exitcode


def root_cause(failures: dict) -> tuple:
    """``(rank, failure)`` of the rank whose failure the others followed.

    torchrun's own pick is the earliest timestamp, which counts whole seconds; on a tie it takes
    the rank its agent saw end first, and the agent looks at the ranks in order. When ``kill -9``
    of rank 1 makes rank 0 fail its next collective within the same poll, that pick is rank 0.
    So among the failures of the earliest second, a rank killed by a signal comes first — other
    than SIGTERM, which is how the agent itself stops the ranks that are left (those it has to
    SIGKILL after its shutdown timeout die seconds later, outside that second).
    """
    earliest = min(failure.timestamp for failure in failures.values())
    first = {rank: f for rank, f in failures.items() if f.timestamp == earliest}  # in the agent's order
    for rank, failure in first.items():
        if failure.exitcode < 0 and -failure.exitcode != signal.SIGTERM:
            return rank, failure
    return next(iter(first.items()))


class _ForcedKills(logging.Handler):
    """Notices torchrun's warning that a rank did not stop within the shutdown timeout."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if "forcefully exiting" in str(record.msg):
            self.seen = True


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = sys.argv[1:] if argv is None else list(argv)
    chosen = any(a.split("=", 1)[0] in ("--signals-to-handle", "--signals_to_handle") for a in args)
    if not chosen and "PET_SIGNALS_TO_HANDLE" not in os.environ:  # torchrun also reads its options from PET_*
        args = ["--signals-to-handle", SIGNALS_TO_HANDLE, *args]  # torchrun's options come first
    forced = _ForcedKills()
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    agent_log.addHandler(forced)
    try:
        torchrun.main(args)
    except SignalException as stopped:
        status = KILLED if forced.seen else signal_exit_code(stopped.sigval)
        how = ("a rank did not stop within the shutdown timeout and was killed" if forced.seen
               else "the ranks stopped (rank 0's session.json tells whether each saved)")
        sys.stderr.write(f"so8t-torchrun: {stopped.sigval.name} received and forwarded to every rank; "
                         f"{how}; exit status {status}\n")
        return status
    except ChildFailedError as failed:
        rank, first = root_cause(failed.failures)
        status = status_of_failure(first.exitcode)
        sys.stderr.write(failed.format_msg() + "\n")
        sys.stderr.write(f"so8t-torchrun: rank {rank} failed first; exit status {status}\n")
        return status
    finally:
        agent_log.removeHandler(forced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
