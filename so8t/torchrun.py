"""``so8t-torchrun``: PyTorch's torchrun, ending with the group's exit status.

It is torchrun itself — ``torch.distributed.run.main`` with the same arguments, the same elastic
agent, rendezvous and signal forwarding — and changes one thing: how the launcher ends. Plain
torchrun turns every outcome but success into status 1 (its agent raises a signal it received as
an exception, and it raises when any rank fails), so a job script cannot tell a run stopped by
SIGTERM and saved (143, re-queue it) from the deadline (75, re-queue it) from a refused config
(2, do not) from a crash (1). Here:

* torchrun got signal N (it forwarded it to every rank, which saved one checkpoint at the same
  step and exited 128+N): ``128 + N``, with one line instead of a traceback;
* ranks failed: the exit status of the rank that failed first (torchrun's "root cause": the
  first its agent saw end; the ranks it then terminated come after), a rank killed by signal N
  counting as ``128 + N`` — 128+N when every rank stopped on signal N sent to one of
  them, 75 at the deadline, 2 for a refused input, 137 after ``kill -9`` of a rank; torchrun's
  failure summary is printed, without the traceback;
* otherwise torchrun's own status.

Wrapping rather than reimplementing: the launcher stays PyTorch's (``accelerate launch`` calls the
same ``torch.distributed.run`` entry); only the exception it ends with is read.
"""

from __future__ import annotations

import sys

from so8t.exit_codes import signal_exit_code

__all__ = ["main", "status_of_failure"]


def status_of_failure(exitcode: int) -> int:
    """A worker's exit status as the shell reports it: ``128 + N`` for one killed by signal N
    (torch records those as ``-N``)."""
    return signal_exit_code(-exitcode) if exitcode < 0 else exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(argv)
    except SignalException as stopped:
        status = signal_exit_code(stopped.sigval)
        sys.stderr.write(f"so8t-torchrun: {stopped.sigval.name} received and forwarded to every rank; "
                         f"exit status {status}\n")
        return status
    except ChildFailedError as failed:
        rank, first = failed.get_first_failure()
        status = status_of_failure(first.exitcode)
        sys.stderr.write(failed.format_msg() + "\n")
        sys.stderr.write(f"so8t-torchrun: rank {rank} failed first; exit status {status}\n")
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
