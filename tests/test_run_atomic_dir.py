"""Folders written aside and swapped in (so8t.run.atomic.write_dir_atomically): the target is
the old folder or the new one, whole, whatever fails or is killed in between."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from so8t.run import atomic
from so8t.run.atomic import OLD_MARK, TMP_MARK, recover_dir, write_dir_atomically


def _fill(text):
    def fill(tmp):
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text(text)
        (tmp / "sub" / "b.txt").write_text(text)
    return fill


def test_a_folder_is_created_then_replaced_whole(tmp_path):
    target = tmp_path / "out"
    write_dir_atomically(target, _fill("one"))
    (target / "stale.txt").write_text("from the old folder")
    write_dir_atomically(target, _fill("two"))
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["a.txt", "sub", "sub/b.txt"]
    assert (target / "sub" / "b.txt").read_text() == "two"
    assert os.listdir(tmp_path) == ["out"]  # no temporary or old folder left


def test_a_failing_fill_leaves_the_old_folder_and_no_leftover(tmp_path):
    target = tmp_path / "out"
    write_dir_atomically(target, _fill("one"))

    def broken(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_dir_atomically(target, broken)
    assert (target / "a.txt").read_text() == "one" and os.listdir(tmp_path) == ["out"]
    with pytest.raises(FileExistsError):
        write_dir_atomically(target, _fill("two"), replace=False)
    assert (target / "a.txt").read_text() == "one"


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    write_dir_atomically(target, _fill("one"))
    real = atomic.replace_path

    def replace(src, dst):
        if TMP_MARK in os.fspath(src):
            raise PermissionError("the folder is in use")
        real(src, dst)

    monkeypatch.setattr(atomic, "replace_path", replace)
    with pytest.raises(PermissionError):
        write_dir_atomically(target, _fill("two"))
    assert (target / "a.txt").read_text() == "one" and os.listdir(tmp_path) == ["out"]


def test_files_and_folders_are_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, atomic.replace_path

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "replace_path", lambda s, d: (real_replace(s, d), events.append(("rename", d))))
    write_dir_atomically(tmp_path / "out", _fill("one"))
    rename = next(i for i, e in enumerate(events) if e == ("rename", tmp_path / "out"))
    tmp = next(e[1] for e in events if e[0] == "fsync" and e[1].endswith("a.txt")).split("/")[0]
    synced = [e[1] for e in events[:rename]]
    assert synced == sorted(synced[:2]) + [f"{tmp}/sub", tmp]  # both files, then deepest folder first
    assert events[rename + 1:] == [("fsync", ".")]  # the parent, after the rename


@pytest.mark.parametrize("crash", ["filled", "moved_aside"])
def test_a_kill_at_any_moment_leaves_the_old_or_the_new_folder(tmp_path, crash):
    """A real process is killed (os._exit, no cleanup) mid-write; the next write recovers."""
    target = tmp_path / "out"
    write_dir_atomically(target, _fill("one"))
    code = f"""
import os, sys
from pathlib import Path
from so8t.run import atomic
real = atomic.replace_path
def replace(src, dst):
    if {crash!r} == "moved_aside" and "{OLD_MARK}" in os.fspath(dst):
        real(src, dst)
    os._exit(9)
atomic.replace_path = replace
def fill(tmp):
    (tmp / "a.txt").write_text("two")
atomic.write_dir_atomically(Path({str(target)!r}), fill)
"""
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9
    if crash == "moved_aside":
        assert not target.exists()  # killed between the two renames: the old one is aside
    recover_dir(target)
    assert (target / "a.txt").read_text() == "one" and os.listdir(tmp_path) == ["out"]
    write_dir_atomically(target, _fill("two"))
    assert (target / "a.txt").read_text() == "two" and os.listdir(tmp_path) == ["out"]
