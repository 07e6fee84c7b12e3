"""so8t.run.atomic: replace-or-nothing writes that leave no temporary files behind."""

import json
import os

import pytest

from so8t.run import atomic
from so8t.run.atomic import atomic_write_json, atomic_write_text


def test_write_then_replace_leaves_only_the_target(tmp_path):
    target = tmp_path / "sub" / "state.txt"  # parent folder is created
    atomic_write_text(target, "one\n")
    assert target.read_text() == "one\n"
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.txt"]


def test_json_round_trip_and_newlines_are_not_translated(tmp_path):
    target = tmp_path / "s.json"
    atomic_write_json(target, {"a": 1, "b": [1, 2]})
    assert json.loads(target.read_text()) == {"a": 1, "b": [1, 2]}
    assert b"\r\n" not in target.read_bytes()


def test_nan_is_refused_before_the_file_is_touched(tmp_path):
    target = tmp_path / "s.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_failed_replace_keeps_old_content_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "s.txt"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.txt"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_mode_follows_umask_not_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tmp_path / "s.txt"
        atomic_write_text(target, "x")
        assert target.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
