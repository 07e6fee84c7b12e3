"""The checkpoint service's defences against losing work, in-process: failed saves are counted
and stop the run, space is never freed by deleting the only good checkpoint, damaged or hostile
files are refused, and I/O errors are not swallowed."""

import errno
import json
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

import so8t.checkpoint.store as store_module
from so8t.checkpoint import CheckpointError, CheckpointService
from so8t.checkpoint.errors import CheckpointingStalledError
from so8t.checkpoint.store import LATEST_FILE, MANIFEST_FILE, STATE_FILE, TENSORS_FILE
from so8t.run import atomic
from so8t.run.session import SessionFile
from tests.test_checkpoint_service import (
    IDENTITY,
    FakeClock,
    make_cfg,
    make_parts,
    make_service,
    run_steps,
    saved,
    train_step,
)

Usage = namedtuple("Usage", "total used free")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_tensor_writes(monkeypatch):
    monkeypatch.setattr(store_module, "_write_tensors", _enospc)


# ---------------------------------------------------------------------- failed saves


@pytest.mark.parametrize("async_write", [False, True])
def test_every_failed_save_is_an_error_counted_and_retried_at_the_next_boundary(tmp_path, monkeypatch, caplog,
                                                                                 async_write):
    service, parts = make_service(tmp_path, every_steps=3, async_write=async_write)
    service.resume("auto")
    run_steps(service, parts, 0, 3)
    service.wait()
    assert saved(tmp_path) == ["step_00000003"]
    with monkeypatch.context() as patch:
        _fail_tensor_writes(patch)
        with caplog.at_level(logging.ERROR):
            for step in range(4, 9):  # due at 6, retried at 7 and 8
                train_step(parts)
                service.maybe_save(step)
                service.wait()  # a background failure is known at the next boundary at the latest
        assert service.failed_saves == 3 and service.failures_in_row == 3
        assert caplog.text.count("FAILED") >= 3 and "retrying at the next step boundary" in caplog.text
    run_steps(service, parts, 8, 9)  # room again: the retry commits at once, not at the cadence
    service.wait()
    assert saved(tmp_path)[-1] == "step_00000009"
    assert service.failures_in_row == 0 and service.stats["failed_saves"] == 3
    service.close()


def test_a_background_failure_is_not_cleared_by_waiting_or_a_later_check(tmp_path, monkeypatch):
    service, parts = make_service(tmp_path, async_write=True)
    service.resume("auto")
    _fail_tensor_writes(monkeypatch)
    run_steps(service, parts, 0, 1)
    assert isinstance(service.wait(), OSError)
    assert service.wait() is None  # reported once...
    assert service.failed_saves == 1  # ...counted once
    with pytest.raises(CheckpointError, match="last background checkpoint write failed"):
        service.close()  # and still known at the end


def test_repeated_failures_stop_the_run(tmp_path, monkeypatch):
    service, parts = make_service(tmp_path, every_steps=2, max_failed_saves=3, max_unprotected=100)
    service.resume("auto")
    run_steps(service, parts, 0, 2)
    _fail_tensor_writes(monkeypatch)
    run_steps(service, parts, 2, 5)  # fails at 4 and 5
    train_step(parts)
    with pytest.raises(CheckpointingStalledError, match="3 saves in a row failed") as info:
        service.maybe_save(6)
    assert "step_00000002" in str(info.value)  # names what there is to resume from


def test_skipped_saves_for_lack_of_space_count_and_stop_the_run_too(tmp_path, monkeypatch, caplog):
    service, parts = make_service(tmp_path, every_steps=1, max_failed_saves=2)
    service.resume("auto")
    run_steps(service, parts, 0, 1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100, 100, 0))
    with caplog.at_level(logging.ERROR):
        train_step(parts)
        service.maybe_save(2)
    assert service.skipped_saves == 1 and "SKIPPING the checkpoint at step 2" in caplog.text
    train_step(parts)
    with pytest.raises(CheckpointingStalledError):
        service.maybe_save(3)


def test_no_commit_for_too_many_cadence_intervals_stops_a_time_based_run(tmp_path, monkeypatch):
    clock = FakeClock()
    parts = make_parts()
    service = CheckpointService(tmp_path, make_cfg(cadence="time", every_seconds=10.0, max_failed_saves=100,
                                                   max_unprotected=3.0), parts, IDENTITY, clock=clock)
    service.resume("auto")
    _fail_tensor_writes(monkeypatch)
    for step in range(1, 4):
        clock.now += 10.0
        train_step(parts)
        service.maybe_save(step)  # fails; 30 s unprotected is not yet more than 3 x 10 s
    clock.now += 10.0
    with pytest.raises(CheckpointingStalledError, match="every_seconds"):
        service.maybe_save(4)


# ---------------------------------------------------------------------- space and retention


def _corrupt(path: Path) -> None:
    data = bytearray((path / TENSORS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / TENSORS_FILE).write_bytes(bytes(data))


def test_retention_and_space_checks_protect_the_newest_verified_checkpoint(tmp_path, monkeypatch):
    service, parts = make_service(tmp_path, keep_last=3)
    service.resume("auto")
    run_steps(service, parts, 0, 3)
    root = tmp_path / "checkpoints"
    _corrupt(root / "step_00000003")  # LATEST names it; the newest *good* one is step 2

    service, parts = make_service(tmp_path, keep_last=1)
    assert service.resume("auto").step == 2
    assert service.newest_verified.step == 2

    # The disk is full: the space check may delete what retention allows, never step 2.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100, 100, 0))
    train_step(parts)
    assert service.maybe_save(3) is None  # skipped
    assert "step_00000002" in saved(tmp_path)
    assert service.store.verify(root / "step_00000002") == []


def test_corrupt_or_foreign_folders_do_not_count_toward_keep_last(tmp_path):
    service, parts = make_service(tmp_path, keep_last=2)
    service.resume("auto")
    run_steps(service, parts, 0, 2)
    root = tmp_path / "checkpoints"
    _corrupt(root / "step_00000002")
    foreign = root / "step_00000050"
    foreign.mkdir()
    (foreign / MANIFEST_FILE).write_text(json.dumps({"format": "someone-else", "step": 50}))

    service, parts = make_service(tmp_path, keep_last=2)
    assert service.resume("auto").step == 1
    run_steps(service, parts, 1, 3)  # commits a new step 2 over the corrupt one, then step 3
    sound = [p.name for p in service.store.list_checkpoints() if not service.store.verify(p)]
    assert sound == ["step_00000002", "step_00000003"]  # two good ones kept, as keep_last=2 asks
    assert foreign.is_dir()  # not ours to delete, and not counted


# ---------------------------------------------------------------------- hostile or broken files


def _three(tmp_path):
    service, parts = make_service(tmp_path)
    service.resume("auto")
    run_steps(service, parts, 0, 3)
    return tmp_path / "checkpoints"


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000), "unparsable MANIFEST.json"),
    (lambda p: _edit_manifest(p, config_identity=["not", "a", "dict"]), "config_identity is not a JSON object"),
    (lambda p: _edit_manifest(p, step="3"), "is not a step number"),
    (lambda p: _edit_manifest(p, sequence="x"), "sequence 'x' is not a number"),
    (lambda p: (p / MANIFEST_FILE).write_bytes(b"\xff\xfe{not utf-8"), "unparsable MANIFEST.json"),
], ids=["deep-nesting", "identity-not-a-dict", "step-a-string", "sequence-a-string", "not-utf8"])
def test_a_malformed_manifest_falls_back_to_the_previous_checkpoint(tmp_path, caplog, damage, reason):
    root = _three(tmp_path)
    damage(root / "step_00000003")
    service, parts = make_service(tmp_path, parts=make_parts(seed=7))
    with caplog.at_level(logging.WARNING):
        assert service.resume("auto").step == 2
    assert reason in caplog.text


def test_a_checkpoint_file_that_is_a_symlink_is_not_followed(tmp_path, caplog):
    root = _three(tmp_path)
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(root / "step_00000003" / TENSORS_FILE, elsewhere)  # same bytes: hashes would match
    (root / "step_00000003" / TENSORS_FILE).unlink()
    os.symlink(elsewhere, root / "step_00000003" / TENSORS_FILE)
    service, _ = make_service(tmp_path, parts=make_parts(seed=7))
    with caplog.at_level(logging.WARNING):
        assert service.resume("auto").step == 2
    assert "state.safetensors is a symbolic link" in caplog.text


def test_a_checkpoint_folder_that_is_a_symlink_is_not_followed(tmp_path, caplog):
    root = _three(tmp_path)
    other = tmp_path / "other"
    shutil.move(root / "step_00000003", other)
    os.symlink(other, root / "step_00000003")
    service, _ = make_service(tmp_path, parts=make_parts(seed=7))
    with caplog.at_level(logging.WARNING):
        assert service.resume("auto").step == 2
    assert "is a symbolic link, not a checkpoint folder" in caplog.text


def test_a_permission_error_on_stat_is_a_rejection_not_a_crash(tmp_path, monkeypatch, caplog):
    root = _three(tmp_path)
    real_stat = Path.stat
    target = root / "step_00000003" / STATE_FILE

    def stat(self, *args, **kwargs):
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    service, _ = make_service(tmp_path, parts=make_parts(seed=7))
    with caplog.at_level(logging.WARNING):
        assert service.resume("auto").step == 2
    assert "cannot read state.json" in caplog.text and "Permission denied" in caplog.text


def test_malformed_numbers_in_state_json_are_a_clear_refusal(tmp_path):
    root = _three(tmp_path)
    # A state.json edited consistently with its manifest (so it verifies), with a counter that
    # is not a number: restoring the part fails, which must be a CheckpointError, not a crash.
    path = root / "step_00000003"
    state = json.loads((path / STATE_FILE).read_text())
    state["parts"]["counter"]["steps"] = {"not": "a number"}
    data = (json.dumps(state) + "\n").encode()
    (path / STATE_FILE).write_bytes(data)
    import hashlib
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))

    class StrictCounter:
        steps = 0

        def state_dict(self):
            return {"steps": self.steps, "tokens": 0}

        def load_state_dict(self, state):
            self.steps = int(state["steps"])  # TypeError on a dict, as Counters does

    parts = {**make_parts(seed=7), "counter": StrictCounter()}
    service = CheckpointService(tmp_path, make_cfg(), parts, IDENTITY)
    with pytest.raises(CheckpointError, match="cannot restore part 'counter'"):
        service.resume("auto")


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[" * 100_000, b'{"attempts": [1, 2]}',
                                     b'{"attempts": [{"index": "one"}]}', b'{"global_step": "12"}'],
                         ids=["not-utf8", "deep-nesting", "attempts-not-objects", "index-a-string", "step-a-string"])
def test_a_damaged_session_file_is_kept_aside_and_never_wedges_a_run(tmp_path, content):
    (tmp_path / "session.json").write_bytes(content)
    session = SessionFile(tmp_path)
    assert session.load()["attempts"] == []
    session.start_attempt(10, None, None)  # works on the fresh file
    session.end_attempt("completed", "end", 0)
    assert json.loads((tmp_path / "session.json").read_text())["status"] == "completed"
    assert [p.name.startswith("session.json.corrupt-") for p in tmp_path.iterdir()].count(True) == 1


# ---------------------------------------------------------------------- I/O errors


def test_an_eio_from_a_folder_fsync_is_not_swallowed(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic.fsync_dir(tmp_path)
    service, parts = make_service(tmp_path)
    service.resume("auto")
    train_step(parts)
    with pytest.raises(CheckpointError, match="Input/output error"):
        service.save_now(1, "end")


def test_a_folder_fsync_the_file_system_does_not_support_is_tolerated(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.fsync_dir(tmp_path)


def test_a_failed_latest_update_after_a_commit_does_not_send_resume_back(tmp_path, monkeypatch, caplog):
    service, parts = make_service(tmp_path)
    service.resume("auto")
    run_steps(service, parts, 0, 2)
    real = store_module.CheckpointStore.write_latest
    monkeypatch.setattr(store_module.CheckpointStore, "write_latest", _enospc)
    with caplog.at_level(logging.ERROR):
        run_steps(service, parts, 2, 3)
    assert "could not update LATEST" in caplog.text
    assert service.failures_in_row == 0  # the checkpoint itself committed
    assert (tmp_path / "checkpoints" / LATEST_FILE).read_text().strip() == "step_00000002"
    monkeypatch.setattr(store_module.CheckpointStore, "write_latest", real)
    service, parts = make_service(tmp_path, parts=make_parts(seed=7))
    assert service.resume("auto").step == 3
