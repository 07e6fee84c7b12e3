"""AsyncCheckpointWriter: one write in flight, errors logged and re-reported."""

import errno
import logging
import threading
import time

import pytest

from so8t.checkpoint.errors import CheckpointError
from so8t.checkpoint.writer import AsyncCheckpointWriter


def test_at_most_one_write_in_flight_and_submit_waits_for_the_previous():
    writer = AsyncCheckpointWriter()
    release = threading.Event()
    running = []
    peak = []
    lock = threading.Lock()

    def job(name, gate=None):
        with lock:
            running.append(name)
            peak.append(len(running))
        if gate is not None:
            gate.wait(5)
        with lock:
            running.remove(name)

    writer.submit(job, "first", release)
    second_submitted = threading.Event()

    def submit_second():
        writer.submit(job, "second")
        second_submitted.set()

    thread = threading.Thread(target=submit_second)
    thread.start()
    time.sleep(0.2)
    assert writer.busy
    assert not second_submitted.is_set()  # blocked behind the first write
    release.set()
    thread.join(5)
    assert second_submitted.is_set()
    assert writer.wait() is None
    assert max(peak) == 1
    writer.close()


def test_a_failed_write_is_logged_and_reported(caplog):
    writer = AsyncCheckpointWriter()

    def failing():
        raise OSError(errno.ENOSPC, "No space left on device")

    with caplog.at_level(logging.ERROR, logger="so8t.checkpoint.writer"):
        writer.submit(failing)
        error = writer.wait()
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert writer.last_error is error and writer.failures == 1
    assert "Background checkpoint write failed" in caplog.text
    # An I/O error is the environment's: its message, no traceback (the CLI shows none).
    assert "No space left" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(CheckpointError):
        writer.raise_if_failed()

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="so8t.checkpoint.writer"):
        writer.submit(lambda: {}["missing"])  # what would be a bug keeps its traceback
        writer.wait()
    assert "Traceback" in caplog.text and "KeyError" in caplog.text

    writer.submit(lambda: None)  # a later success clears the "last write failed" state
    assert writer.wait() is None and writer.last_error is None and writer.failures == 2
    writer.raise_if_failed()
    writer.close()


def test_close_waits_and_returns_the_last_error_then_refuses_work():
    writer = AsyncCheckpointWriter()
    done = []

    def slow():
        time.sleep(0.1)
        done.append(True)
        raise RuntimeError("boom")

    writer.submit(slow)
    error = writer.close()
    assert done == [True] and isinstance(error, RuntimeError)
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda: None)
