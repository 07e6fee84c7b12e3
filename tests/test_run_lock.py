"""so8t.run.lock: one writer per run dir; a dead holder never blocks."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from so8t.run.lock import RunLock, RunLockedError

HOLDER = """
import sys, time
from so8t.run.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("LOCKED", flush=True)
time.sleep(60)
"""


def _start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "LOCKED", line
    return proc


TRY = """
import sys
from so8t.run.lock import RunLock, RunLockedError
try:
    RunLock(sys.argv[1]).acquire()
except RunLockedError:
    print("REFUSED")
else:
    print("ACQUIRED")
"""


def _try_in_child(run_dir) -> str:
    out = subprocess.run([sys.executable, "-c", TRY, str(run_dir)], capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_writes_holder_record_and_release_removes_it(tmp_path):
    run_dir = tmp_path / "run"  # created by acquire
    with RunLock(run_dir) as lock:
        info = json.loads((run_dir / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert "started" in info and isinstance(info["argv"], list)
        assert lock.held
    assert not (run_dir / ".lock").exists()
    assert not lock.held


def test_second_lock_in_same_process_is_refused_with_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path).acquire()
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "started" in msg
    assert err.value.holder["pid"] == os.getpid()
    RunLock(tmp_path).acquire()  # free again after release


@pytest.mark.slow
def test_live_process_blocks_us_then_kill_9_frees_the_lock(tmp_path, caplog):
    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no cleanup runs
        proc.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid  # record left behind
    with caplog.at_level(logging.WARNING, logger="so8t.run.lock"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"previous holder pid {proc.pid}" in caplog.text


@pytest.mark.slow
def test_stale_record_of_dead_pid_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="so8t.run.lock"):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert f"previous holder pid {dead}" in caplog.text
    assert lock.read_holder()["pid"] == os.getpid()
    lock.release()


def test_release_keeps_a_record_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "y"}))
    lock.release()
    assert (tmp_path / ".lock").exists()


@pytest.mark.slow
def test_acquire_twice_is_idempotent(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.acquire()
    assert lock.read_holder()["pid"] == os.getpid()
    assert _try_in_child(tmp_path) == "REFUSED"  # still held: another process is refused
    lock.release()
    lock.release()
    assert not (tmp_path / ".lock").exists()  # our record is gone after the first release
    with RunLock(tmp_path) as again:  # and the run dir is free
        assert again.read_holder()["pid"] == os.getpid()


def test_release_from_another_thread(tmp_path):
    import threading

    lock = RunLock(tmp_path)
    lock.acquire()
    t = threading.Thread(target=lock.release)
    t.start()
    t.join()
    RunLock(tmp_path).acquire()


def test_held_by_live_process_reads_the_holder_record_as_the_lock_writes_it(tmp_path):
    from so8t.run.lock import RunLock, held_by_live_process, read_lock_holder

    assert read_lock_holder(tmp_path) is None and not held_by_live_process(tmp_path)
    with RunLock(tmp_path):
        assert read_lock_holder(tmp_path)["pid"] == os.getpid()
        assert held_by_live_process(tmp_path)
    assert not held_by_live_process(tmp_path)  # released: the record is gone


def test_held_by_live_process_judges_a_dead_pid_foreign_host_and_garbage(tmp_path):
    from so8t.run.lock import held_by_live_process

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record = tmp_path / ".lock"
    record.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "started": "x"}))
    assert not held_by_live_process(tmp_path)  # a dead holder
    record.write_text(json.dumps({"pid": proc.pid, "host": "elsewhere", "started": "x"}))
    assert held_by_live_process(tmp_path)  # another host: cannot tell from here, so assume live
    for garbage in ("[1, 2]", "{not json", json.dumps({"pid": "7", "host": socket.gethostname()})):
        record.write_text(garbage)
        assert not held_by_live_process(tmp_path), garbage
