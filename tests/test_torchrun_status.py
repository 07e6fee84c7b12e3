"""Which rank's status ``so8t-torchrun`` ends with when several failed (so8t/torchrun.py).

The launches themselves (SIGTERM and SIGUSR1 to the launcher, the deadline, ``kill -9`` of a rank)
run through the real launcher in tests/test_distributed_cli.py; this pins the choice among
failures that torchrun's agent saw in the same second, in the order it saw them.
"""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from so8t.torchrun import root_cause, status_of_failure


def seen(*failures: tuple[int, int, int]) -> dict[int, ProcessFailure]:
    """(rank, exitcode, timestamp) in the order the agent saw them."""
    out = {}
    for rank, exitcode, timestamp in failures:
        failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")
        failure.timestamp = timestamp
        out[rank] = failure
    return out


def status(failures: dict[int, ProcessFailure]) -> tuple[int, int]:
    rank, failure = root_cause(failures)
    return rank, status_of_failure(failure.exitcode)


def test_a_rank_killed_by_a_signal_comes_first_in_its_second():
    # kill -9 of rank 1; rank 0 failed its collective (1) and was seen first, in the same poll.
    assert status(seen((0, 1, 100), (1, -9, 100))) == (1, 137)
    # ... or rank 0 was still running and the agent stopped it with SIGTERM (-15) afterwards.
    assert status(seen((1, -9, 100), (0, -15, 100))) == (1, 137)


def test_ranks_the_agent_killed_after_its_shutdown_timeout_do_not_hide_the_first_failure():
    # Rank 0 refused its input (2); rank 1 did not stop within the timeout and was SIGKILLed.
    assert status(seen((0, 2, 100), (1, -9, 130))) == (0, 2)


def test_otherwise_the_first_the_agent_saw_in_the_earliest_second():
    assert status(seen((0, 143, 100), (1, 143, 100))) == (0, 143)
    assert status(seen((1, 75, 100), (0, 75, 101))) == (1, 75)


def test_statuses_are_the_shells():
    assert [status_of_failure(code) for code in (2, 75, 143, -15, -9)] == [2, 75, 143, 143, 137]
