"""Durability of a checkpoint save, proven from its file-system operations.

``kill -9`` cannot show a missing fsync (the page cache survives the process), so these tests
trace the calls a save makes — every ``os.fsync`` (with what it made durable: a file's bytes or
a folder's entries) and every rename — and check two things:

* the order: each file fsynced before its folder is renamed into place, the folder fsynced, the
  parent fsynced after the rename, ``LATEST`` replaced after the commit is durable;
* a power cut after any prefix of those operations: the disk then holds only what had been made
  durable (file bytes as of their last fsync, folder entries as of their folder's last fsync,
  files never fsynced empty), and resume must load the new checkpoint or the previous one, bit
  for bit, never garbage and never nothing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from so8t.checkpoint.store import LATEST_FILE
from tests.test_checkpoint_service import make_parts, make_service, run_steps, train_step


@dataclass
class Trace:
    """What a traced stretch of code did to the disk, as inodes (renames move names, not data)."""

    root: Path
    events: list[tuple] = field(default_factory=list)

    def rel(self, path: str | Path) -> str:
        return os.path.relpath(path, self.root)


def _snapshot_dir(path: str) -> dict[str, tuple[int, bool]]:
    entries = {}
    for name in os.listdir(path):
        info = os.lstat(os.path.join(path, name))
        entries[name] = (info.st_ino, stat.S_ISDIR(info.st_mode))
    return entries


@pytest.fixture
def tracer(monkeypatch):
    def start(root: Path) -> Trace:
        trace = Trace(root)
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            real_fsync(fd)  # durable only once it returned
            path = os.readlink(f"/proc/self/fd/{fd}")
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                trace.events.append(("fsync_dir", trace.rel(path), info.st_ino, _snapshot_dir(path)))
            else:
                with open(path, "rb") as f:
                    trace.events.append(("fsync_file", trace.rel(path), info.st_ino, f.read()))

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            trace.events.append(("rename", trace.rel(src), trace.rel(dst)))

        def rename(src, dst, *args, **kwargs):
            real_rename(src, dst, *args, **kwargs)
            trace.events.append(("rename", trace.rel(src), trace.rel(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        return trace

    return start


def _durable_image(root: Path) -> tuple[dict, dict, int]:
    """Everything under ``root`` as (folder listings by inode, file bytes by inode, root inode)."""
    listings, contents = {}, {}
    for folder, _dirs, files in os.walk(root):
        listings[os.lstat(folder).st_ino] = _snapshot_dir(folder)
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                contents[os.lstat(path).st_ino] = f.read()
    return listings, contents, os.lstat(root).st_ino


def _materialise(image, events, target: Path) -> None:
    """The disk after a power cut that followed ``events``: only fsynced state survives."""
    listings, contents, root_ino = {**image[0]}, {**image[1]}, image[2]
    for event in events:
        if event[0] == "fsync_dir":
            listings[event[2]] = event[3]
        elif event[0] == "fsync_file":
            contents[event[2]] = event[3]

    def build(ino: int, path: Path) -> None:
        path.mkdir(exist_ok=True)
        for name, (child, is_dir) in listings.get(ino, {}).items():
            if is_dir:
                build(child, path / name)
            else:  # a file whose bytes were never fsynced comes back empty
                (path / name).write_bytes(contents.get(child, b""))

    build(root_ino, target)


def _state_of(parts) -> dict:
    return {"counter": parts["counter"].steps, **{k: v.clone() for k, v in parts["model"].state_dict().items()}}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _traced_save(tmp_path, tracer):
    run = tmp_path / "run"
    service, parts = make_service(run, keep_last=1)
    service.resume("auto")
    run_steps(service, parts, 0, 1)
    before = _state_of(parts)
    image = _durable_image(run)
    train_step(parts)
    trace = tracer(run)
    service.save_now(2, "manual")  # keep_last=1: retention deletes step 1 in the same save
    return run, image, trace, before, _state_of(parts)


def test_a_save_fsyncs_files_then_folder_then_parent_and_moves_latest_last(tmp_path, tracer):
    _run, _image, trace, _before, _after = _traced_save(tmp_path, tracer)
    events = trace.events
    names = [e[:2] if e[0] != "rename" else e for e in events]

    commit = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == "checkpoints/step_00000002")
    tmp = events[commit][1]
    for file in ("state.safetensors", "state.json", "MANIFEST.json"):
        synced = [i for i, e in enumerate(events) if e[:2] == ("fsync_file", f"{tmp}/{file}")]
        assert synced and synced[-1] < commit, f"{file} is not fsynced before its folder's rename: {names}"
    folder = [i for i, e in enumerate(events) if e[:2] == ("fsync_dir", tmp)]
    last_file = max(i for i, e in enumerate(events) if e[0] == "fsync_file" and e[1].startswith(tmp + "/"))
    assert folder and last_file < folder[-1] < commit, f"the folder is not fsynced after its files: {names}"
    parent = [i for i, e in enumerate(events) if e[:2] == ("fsync_dir", "checkpoints") and i > commit]
    assert parent, f"the parent is not fsynced after the rename: {names}"

    latest = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == f"checkpoints/{LATEST_FILE}"]
    assert len(latest) == 1 and latest[0] > parent[0], f"LATEST moved before the commit was durable: {names}"
    latest_tmp = events[latest[0]][1]
    assert any(e[:2] == ("fsync_file", latest_tmp) for e in events[:latest[0]]), "LATEST's bytes not fsynced"
    assert any(e[:2] == ("fsync_dir", "checkpoints") for e in events[latest[0]:]), "LATEST's rename not fsynced"
    # Nothing of the save proper comes after LATEST; only retention's removal of step 1 may.
    after = [e for e in events[latest[0] + 1:] if e[0] == "rename"]
    assert all(e[1] == "checkpoints/step_00000001" and "/.del-" in "/" + e[2] for e in after), after


def test_a_power_cut_after_any_operation_of_a_save_leaves_the_new_or_the_previous_checkpoint(tmp_path, tracer):
    _run, image, trace, before, after = _traced_save(tmp_path, tracer)
    assert len(trace.events) >= 10
    outcomes = []
    for cut in range(len(trace.events) + 1):
        disk = tmp_path / f"cut{cut:03d}"
        _materialise(image, trace.events[:cut], disk)
        service, parts = make_service(disk, parts=make_parts(seed=99))
        result = service.resume("auto")
        assert result is not None, f"power cut after {cut} operations: resume found nothing"
        state = _state_of(parts)
        assert result.step in (1, 2), cut
        assert _same(state, before if result.step == 1 else after), \
            f"cut {cut}: resumed state is not step {result.step}'s"
        outcomes.append(result.step)
    # The cut points cover both sides of the commit: early cuts give step 1, late ones step 2.
    assert outcomes[0] == 1 and outcomes[-1] == 2
    assert outcomes == sorted(outcomes), f"a later cut went back to an older checkpoint: {outcomes}"
