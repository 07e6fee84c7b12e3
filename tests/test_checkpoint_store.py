"""CheckpointStore: atomic layout, manifest, verification, cleanup, safe deletion."""

import errno
import json
import logging
import os

import pytest
import torch

from so8t.checkpoint.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointStore,
    checkpoint_name,
    parse_step,
)
from tests.conftest import full_disk


def _tensors(value: float = 1.0):
    return {"w": torch.full((3, 2), value), "step": torch.tensor(7)}


def _save(store, step, value=1.0):
    return store.save(step, _tensors(value), {"n": step}, {"covers": ["w"], "config_identity": {"model.x": 1}})


def test_save_layout_and_manifest(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    path = _save(store, 40)

    assert path == tmp_path / "checkpoints" / "step_00000040"
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_FILE, STATE_FILE, TENSORS_FILE]
    assert sorted(p.name for p in store.root.iterdir()) == [LATEST_FILE, "step_00000040"]  # no temporaries
    assert (store.root / LATEST_FILE).read_text().strip() == "step_00000040"

    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format"] == FORMAT_NAME and manifest["format_version"] == FORMAT_VERSION
    assert manifest["step"] == 40
    assert manifest["covers"] == ["w"] and manifest["config_identity"] == {"model.x": 1}
    assert set(manifest["files"]) == {TENSORS_FILE, STATE_FILE}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert {"python", "torch", "safetensors", "numpy", "transformers"} <= set(manifest["versions"])
    assert manifest["created"] and manifest["created_unix"] > 0

    assert store.verify(path) == []
    tensors, state, loaded_manifest = store.load(path)
    assert torch.equal(tensors["w"], _tensors()["w"]) and state == {"n": 40}
    assert loaded_manifest == manifest


def test_reserved_manifest_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        CheckpointStore(tmp_path).save(1, _tensors(), None, {"files": {}})


def test_list_checkpoints_sorted_by_step_and_ignores_other_entries(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in (100_000_000, 3, 20):  # 9 digits sorts after 8 by number, not text
        _save(store, step)
    (tmp_path / "notes").mkdir()
    (tmp_path / "step_12").mkdir()
    (tmp_path / ".tmp-step_00000050-abcd").mkdir()
    assert [parse_step(p.name) for p in store.list_checkpoints()] == [3, 20, 100_000_000]


def test_resave_of_the_same_step_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 5, value=1.0)
    path = _save(store, 5, value=2.0)
    assert store.verify(path) == []
    assert torch.equal(store.load(path)[0]["w"], torch.full((3, 2), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step_00000005"]


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: (p / TENSORS_FILE).write_bytes((p / TENSORS_FILE).read_bytes()[:-9]), "size mismatch"),
        (lambda p: _flip_byte(p / TENSORS_FILE), "sha256 mismatch for state.safetensors"),
        (lambda p: _flip_byte(p / STATE_FILE), "sha256 mismatch for state.json"),
        (lambda p: (p / MANIFEST_FILE).unlink(), "missing MANIFEST.json"),
        (lambda p: (p / MANIFEST_FILE).write_text("{not json"), "unparsable MANIFEST.json"),
        (lambda p: (p / STATE_FILE).unlink(), "missing file state.json"),
        (lambda p: _edit_manifest(p, step=41), "step mismatch"),
        (lambda p: _edit_manifest(p, format_version=FORMAT_VERSION + 1), "format_version"),
    ],
)
def test_verify_reports_each_problem(tmp_path, damage, expected):
    store = CheckpointStore(tmp_path)
    path = _save(store, 40)
    damage(path)
    problems = store.verify(path)
    assert any(expected in p for p in problems), problems


def test_verify_refuses_file_names_outside_the_folder(tmp_path):
    store = CheckpointStore(tmp_path)
    path = _save(store, 1)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"]["../LATEST"] = {"size": 1, "sha256": "0"}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert any("invalid file name" in p for p in store.verify(path))


@pytest.mark.parametrize("failing_file", [TENSORS_FILE, STATE_FILE, MANIFEST_FILE])
def test_failed_write_removes_the_temporary_folder_and_keeps_older_checkpoints(tmp_path, monkeypatch, failing_file):
    store = CheckpointStore(tmp_path)
    good = _save(store, 1)

    with monkeypatch.context() as patch:
        full_disk(patch, failing_file)
        with pytest.raises(OSError) as info:
            _save(store, 2)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step_00000001"]
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step_00000001"
    assert store.verify(good) == []
    assert store.verify(_save(store, 2)) == []  # and the store still works


def test_cleanup_removes_leftovers_and_restores_a_folder_left_aside(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    aside = _save(store, 2)
    os.replace(aside, tmp_path / ".old-step_00000002-1234abcd")  # crash mid re-save
    partial = tmp_path / ".tmp-step_00000003-deadbeef"
    partial.mkdir()
    (partial / TENSORS_FILE).write_bytes(b"half")
    (tmp_path / ".del-step_00000000-cafe0000").mkdir()
    (tmp_path / ".LATEST.123.abcd.tmp").write_text("step_00000003")

    with caplog.at_level(logging.WARNING, logger="so8t.checkpoint.store"):
        removed = store.cleanup_temporaries()
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step_00000001", "step_00000002"]
    assert store.verify(tmp_path / "step_00000002") == []
    assert "interrupted save" in caplog.text and "Restoring checkpoint step_00000002" in caplog.text


def test_delete_only_removes_folders_the_store_wrote(tmp_path):
    store = CheckpointStore(tmp_path)
    mine = _save(store, 1)
    foreign = tmp_path / "step_00000002"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"x")
    elsewhere = tmp_path.parent / "step_00000003"
    elsewhere.mkdir(exist_ok=True)
    assert store.delete(foreign) is False and foreign.exists()
    assert store.delete(elsewhere) is False and elsewhere.exists()
    assert store.delete(mine) is True and not mine.exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_read_latest_ignores_garbage(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    assert store.read_latest() is None
    (tmp_path / LATEST_FILE).write_text("../../etc")
    assert store.read_latest() is None
    assert "not a checkpoint folder name" in caplog.text
    (tmp_path / LATEST_FILE).write_text(checkpoint_name(9) + "\n")
    assert store.read_latest() == "step_00000009"


def _flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(path, **changes):
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
