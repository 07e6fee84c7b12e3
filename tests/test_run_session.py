"""so8t.run.session: the run's story across processes, written atomically."""

import json
import logging
import os
import time

import pytest

from so8t.run.session import SessionFile, code_version


def _read(run_dir):
    return json.loads((run_dir / "session.json").read_text())


def test_start_update_end(tmp_path):
    s = SessionFile(tmp_path, min_write_interval=0)
    assert s.load()["attempts"] == []  # missing file is fine
    assert s.start_attempt(max_steps=10, config_identity={"model": "tiny"}, resumed_from_step=0) == 1
    data = _read(tmp_path)
    assert data["status"] == "running" and data["max_steps"] == 10
    assert data["config_identity"] == {"model": "tiny"}
    att = data["attempts"][0]
    assert att["status"] == "running" and att["pid"] == os.getpid() and att["resumed_from_step"] == 0
    assert att["host"] and att["code_version"] == code_version() and att["started"]

    ckpt = {"step": 5, "path": "checkpoints/step_000005", "reason": "step"}
    s.update(5, 1.5, last_checkpoint=ckpt)
    data = _read(tmp_path)
    assert data["global_step"] == 5 and data["total_training_time"] == 1.5 and data["last_checkpoint"] == ckpt

    s.update(10, 3.0, last_checkpoint={"step": 10, "path": "final", "reason": "end"})
    s.end_attempt("completed", "end", 0)
    data = _read(tmp_path)
    assert data["status"] == "completed" and data["global_step"] == 10
    att = data["attempts"][0]
    assert (att["status"], att["end_reason"], att["exit_code"]) == ("completed", "end", 0)
    assert att["ended"] is not None
    assert [p.name for p in tmp_path.iterdir()] == ["session.json"]  # no temp files


def test_update_is_throttled_but_checkpoints_always_write(tmp_path):
    s = SessionFile(tmp_path, min_write_interval=3600)
    s.start_attempt(10, None, 0)
    s.update(1, 0.1)
    assert _read(tmp_path)["global_step"] == 0  # not written yet
    s.update(2, 0.2, last_checkpoint={"step": 2, "path": "c2", "reason": "time"})
    assert _read(tmp_path)["global_step"] == 2
    s.update(3, 0.3)
    s.flush()
    assert _read(tmp_path)["global_step"] == 3


def test_misuse_is_refused(tmp_path):
    s = SessionFile(tmp_path)
    with pytest.raises(RuntimeError):
        s.update(1, 0.0)
    s.start_attempt(10, None, 0)
    with pytest.raises(ValueError):
        s.update(1, 0.0, last_checkpoint={"step": 1, "path": "p", "reason": "whenever"})
    with pytest.raises(ValueError):
        s.end_attempt("running", "end", 0)


def test_attempt_left_running_is_recorded_as_killed(tmp_path, caplog):
    first = SessionFile(tmp_path, min_write_interval=0)
    first.start_attempt(10, "id", 0)
    first.update(4, 2.0)
    last_sign_of_life = _read(tmp_path)["updated"]
    del first  # kill -9: nothing else runs

    with caplog.at_level(logging.WARNING, logger="so8t.run.session"):
        second = SessionFile(tmp_path)
        assert second.start_attempt(10, "id", resumed_from_step=3) == 2
    assert "recorded as killed" in caplog.text
    a1, a2 = _read(tmp_path)["attempts"]
    assert (a1["status"], a1["end_reason"], a1["exit_code"], a1["ended"]) == (
        "interrupted", "killed", None, last_sign_of_life)
    assert (a2["index"], a2["status"], a2["resumed_from_step"]) == (2, "running", 3)


def test_three_attempts_interrupt_kill_finish_time_excludes_gaps(tmp_path):
    # attempt 1: SIGTERM at step 4 after ~0.1 s of work; the trainer's counter says 2.0 s
    s = SessionFile(tmp_path, min_write_interval=0)
    s.start_attempt(12, "id", 0)
    time.sleep(0.1)
    s.update(4, 2.0, last_checkpoint={"step": 4, "path": "c4", "reason": "signal"})
    s.end_attempt("interrupted", "SIGTERM", 143)
    time.sleep(0.6)  # gap between attempts: must not count anywhere

    # attempt 2: resumes at 4 with the checkpointed counter 2.0, then is killed -9
    s = SessionFile(tmp_path, min_write_interval=0)
    s.start_attempt(12, "id", 4)
    time.sleep(0.1)
    s.update(8, 4.0, last_checkpoint={"step": 8, "path": "c8", "reason": "time"})
    del s
    time.sleep(0.6)

    # attempt 3: resumes at 8 and finishes
    s = SessionFile(tmp_path, min_write_interval=0)
    s.start_attempt(12, "id", 8)
    time.sleep(0.1)
    s.update(12, 6.0, last_checkpoint={"step": 12, "path": "final", "reason": "end"})
    s.end_attempt("completed", "end", 0)

    data = _read(tmp_path)
    assert [(a["index"], a["end_reason"], a["exit_code"], a["status"]) for a in data["attempts"]] == [
        (1, "SIGTERM", 143, "interrupted"), (2, "killed", None, "interrupted"), (3, "end", 0, "completed")]
    assert [a["resumed_from_step"] for a in data["attempts"]] == [0, 4, 8]
    assert data["status"] == "completed" and data["total_training_time"] == 6.0
    # each attempt's own active time covers its work only, never the 0.6 s gaps
    active = [a["active_seconds"] for a in data["attempts"]]
    assert all(0.09 <= t < 0.5 for t in active), active


def test_corrupt_file_is_kept_aside_and_a_fresh_one_started(tmp_path, caplog):
    (tmp_path / "session.json").write_text('{"status": "runn')  # torn by a bad disk or an editor
    s = SessionFile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="so8t.run.session"):
        assert s.load()["attempts"] == []
    assert "unreadable" in caplog.text
    backups = list(tmp_path.glob("session.json.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_text() == '{"status": "runn'
    assert s.start_attempt(5, None, 0) == 1
    assert _read(tmp_path)["attempts"][0]["index"] == 1


def test_code_version_is_a_string():
    v = code_version()
    assert isinstance(v, str) and v
