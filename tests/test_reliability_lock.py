"""One writer per run folder, even where flock is weak: the filelock fallback still excludes a
second writer, a lock that cannot be taken is a clear refusal, and fencing stops an older
writer at its next commit once a newer one replaced the owner token."""

from __future__ import annotations

import errno
import fcntl
import json
import warnings

import pytest

from so8t.checkpoint import CheckpointService
from so8t.checkpoint.errors import OwnershipLostError
from so8t.run.atomic import atomic_write_json
from so8t.run.lock import OWNER_NAME, RunLock, RunLockedError, RunLockUnavailableError
from tests.test_checkpoint_service import IDENTITY, make_cfg, make_parts, run_steps, saved, train_step


def test_without_flock_filelock_falls_back_and_still_excludes_a_second_writer(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    first = RunLock(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.acquire()
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()
        first.release()
        second = RunLock(tmp_path)
        second.acquire()  # free again once released
        second.release()


def test_a_lock_that_cannot_be_taken_is_a_clear_refusal(tmp_path):
    (tmp_path / ".lock.os").symlink_to(tmp_path / "elsewhere")  # filelock refuses to follow it
    with pytest.raises(RunLockUnavailableError, match="cannot take the single-writer lock"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("async_write", [False, True])
def test_an_older_writer_stops_at_its_next_commit_once_a_newer_one_took_over(tmp_path, async_write):
    lock = RunLock(tmp_path)
    lock.acquire()
    parts = make_parts()
    service = CheckpointService(tmp_path, make_cfg(async_write=async_write), parts, IDENTITY, fence=lock.check_owner)
    service.resume("auto")
    run_steps(service, parts, 0, 1)
    service.wait()
    assert saved(tmp_path) == ["step_00000001"]
    # A second process got past a lock that does not exclude (a network file system) and wrote
    # its own token.
    atomic_write_json(tmp_path / OWNER_NAME, {"token": "the-newer-writer"})
    train_step(parts)
    with pytest.raises(OwnershipLostError, match="another process took over"):
        service.maybe_save(2)
        service.wait()
        train_step(parts)
        service.maybe_save(3)
    assert saved(tmp_path) == ["step_00000001"]  # nothing interleaved with the newer writer
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_00000001"
    assert json.loads((tmp_path / OWNER_NAME).read_text())["token"] == "the-newer-writer"
