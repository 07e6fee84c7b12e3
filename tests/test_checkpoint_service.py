"""CheckpointService end to end on tiny stateful parts: save, resume, corruption, disk, identity."""

import errno
import json
import logging
import random
import shutil
import threading
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from so8t.checkpoint import CheckpointError, CheckpointService
from so8t.checkpoint.store import LATEST_FILE, MANIFEST_FILE, STATE_FILE, TENSORS_FILE
from tests.conftest import full_disk

IDENTITY = {"model.hidden": 4, "adapter.kind": "so8", "ppo.lr": 0.01, "seed": 0}


class Counter:
    """The simplest stateful part: a trainer's counters."""

    def __init__(self):
        self.steps = 0
        self.tokens = 0

    def state_dict(self):
        return {"steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, state):
        self.steps, self.tokens = state["steps"], state["tokens"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_cfg(**overrides):
    cfg = dict(cadence="step", every_seconds=60.0, every_steps=1, keep_last=5, keep_every_steps=None,
               save_on_end=True, async_write=False, max_failed_saves=5, max_unprotected=3.0)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def make_parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optim": torch.optim.Adam(model.parameters(), lr=1e-2), "counter": Counter()}


def train_step(parts):
    """One update whose outcome depends on every RNG, so a wrong restore shows up."""
    model, optim, counter = parts["model"], parts["optim"], parts["counter"]
    x = torch.randn(8, 4)
    scale = 1.0 + random.random() + float(np.random.rand())
    optim.zero_grad()
    (model(x).pow(2).mean() * scale).backward()
    optim.step()
    counter.steps += 1
    counter.tokens += 8


def make_service(run_dir, parts=None, identity=IDENTITY, **cfg):
    parts = parts if parts is not None else make_parts()
    service = CheckpointService(run_dir, make_cfg(**cfg), parts, identity,
                                extra_state=lambda: {"train_seconds": 1.5 * parts["counter"].steps})
    return service, parts


def run_steps(service, parts, start, stop):
    for step in range(start + 1, stop + 1):
        train_step(parts)
        service.maybe_save(step)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def saved(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


# ---------------------------------------------------------------------- save & resume


def test_resume_is_bit_exact(tmp_path):
    seed_all(1)
    straight = make_parts()
    for _ in range(6):
        train_step(straight)

    seed_all(1)
    service, parts = make_service(tmp_path / "run", every_steps=3)
    assert service.resume("auto") is None
    run_steps(service, parts, 0, 4)  # saved at step 3; step 4 is lost with the "crash"
    service.close()

    seed_all(999)  # a new process: different seeds, fresh parts
    service, resumed = make_service(tmp_path / "run", parts=make_parts(seed=5), every_steps=3)
    result = service.resume("auto")
    assert result.step == 3 and result.path.name == "step_00000003" and result.reason == "step"
    assert result.extra_state == {"train_seconds": 4.5}
    assert resumed["counter"].steps == 3
    for _ in range(3):
        train_step(resumed)
    service.close()

    for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)
    s, r = straight["optim"].state_dict(), resumed["optim"].state_dict()
    for index in s["state"]:
        for key in s["state"][index]:
            assert torch.equal(s["state"][index][key], r["state"][index][key])
    assert straight["counter"].state_dict() == resumed["counter"].state_dict()


def test_manifest_records_reason_covers_and_identity(tmp_path):
    service, parts = make_service(tmp_path)
    service.resume("auto")
    train_step(parts)
    path = service.save_now(1, "signal")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["reason"] == "signal"
    assert manifest["covers"] == ["model", "optim", "counter", "rng", "extra"]
    assert manifest["config_identity"] == IDENTITY
    assert manifest["world_size"] == 1
    assert service.last_saved.step == 1 and service.last_saved.reason == "signal"


def test_time_cadence_through_the_service(tmp_path):
    clock = FakeClock()
    parts = make_parts()
    service = CheckpointService(tmp_path, make_cfg(cadence="time", every_seconds=10), parts, IDENTITY, clock=clock)
    service.resume("auto")
    assert service.maybe_save(1) is None
    clock.now = 10.0
    assert service.maybe_save(2).name == "step_00000002"
    clock.now = 19.0
    assert service.maybe_save(3) is None
    assert saved(tmp_path) == ["step_00000002"]


def test_async_snapshot_is_taken_at_the_boundary(tmp_path, monkeypatch):
    service, parts = make_service(tmp_path, async_write=True)
    service.resume("auto")
    gate = threading.Event()
    real_save = service.store.save

    def slow_save(*args, **kwargs):
        gate.wait(5)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(service.store, "save", slow_save)
    expected = parts["model"].weight.detach().clone()
    path = service.maybe_save(1)
    assert service.writer.busy
    with torch.no_grad():
        parts["model"].weight.add_(1.0)  # training goes on and mutates in place
    gate.set()
    assert service.wait() is None
    service.close()
    tensors, _, _ = service.store.load(path)
    assert torch.equal(tensors["parts.model.weight"], expected)


# ---------------------------------------------------------------------- corruption


def _three_checkpoints(run_dir):
    service, parts = make_service(run_dir)
    service.resume("auto")
    run_steps(service, parts, 0, 3)
    service.close()
    return run_dir / "checkpoints"


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, expected_step, expected_log",
    [
        (lambda c: (c / "step_00000003" / TENSORS_FILE).write_bytes(
            (c / "step_00000003" / TENSORS_FILE).read_bytes()[:100]), 2, "size mismatch for state.safetensors"),
        (lambda c: _flip_byte(c / "step_00000003" / TENSORS_FILE), 2, "sha256 mismatch for state.safetensors"),
        (lambda c: _flip_byte(c / "step_00000003" / STATE_FILE), 2, "sha256 mismatch for state.json"),
        (lambda c: (c / "step_00000003" / MANIFEST_FILE).unlink(), 2, "missing MANIFEST.json"),
        (lambda c: (c / LATEST_FILE).unlink(), 3, "LATEST is missing"),
        (lambda c: (c / LATEST_FILE).write_text("step_00000099\n"), 3, "names step_00000099, which does not exist"),
        (lambda c: (c / "step_00000003" / TENSORS_FILE).unlink(), 2, "(named by LATEST): missing file"),
        (lambda c: (c / ".tmp-step_00000004-0badf00d").mkdir(), 3, "interrupted save"),
    ],
    ids=["truncated", "flipped-byte", "flipped-json", "no-manifest", "no-latest", "latest-missing-folder",
         "latest-corrupt-folder", "leftover-temp"],
)
def test_resume_skips_damaged_checkpoints_and_says_why(tmp_path, caplog, damage, expected_step, expected_log):
    checkpoints = _three_checkpoints(tmp_path)
    damage(checkpoints)
    service, parts = make_service(tmp_path, parts=make_parts(seed=7))
    with caplog.at_level(logging.WARNING):
        result = service.resume("auto")
    assert result.step == expected_step
    assert parts["counter"].steps == expected_step
    assert expected_log in caplog.text
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir())


def test_the_newest_commit_wins_over_latest_and_over_folder_names(tmp_path):
    checkpoints = _three_checkpoints(tmp_path)
    # LATEST is a hint: its update failing after step 3 committed must not send resume back.
    (checkpoints / LATEST_FILE).write_text("step_00000002\n")
    service, parts = make_service(tmp_path, parts=make_parts(seed=7))
    assert service.resume("auto").step == 3


def test_an_abandoned_higher_numbered_folder_loses_to_later_commits(tmp_path):
    checkpoints = _three_checkpoints(tmp_path)
    manifest = json.loads((checkpoints / "step_00000002" / MANIFEST_FILE).read_text())
    # Step 2 re-committed after step 3 (a later history): its sequence is higher.
    manifest["sequence"] = 99
    (checkpoints / "step_00000002" / MANIFEST_FILE).write_text(json.dumps(manifest))
    (checkpoints / LATEST_FILE).write_text("step_00000003\n")
    service, _ = make_service(tmp_path, parts=make_parts(seed=7))
    assert service.resume("auto").step == 2


def test_latest_breaks_ties_between_checkpoints_without_a_sequence(tmp_path):
    checkpoints = _three_checkpoints(tmp_path)
    for path in checkpoints.glob("step_*"):  # as written before commit sequences existed
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        del manifest["sequence"]
        (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    (checkpoints / LATEST_FILE).write_text("step_00000002\n")
    service, _ = make_service(tmp_path, parts=make_parts(seed=7))
    assert service.resume("auto").step == 2


def test_all_corrupt_refuses_to_start_and_lists_each(tmp_path):
    checkpoints = _three_checkpoints(tmp_path)
    for step in (1, 2, 3):
        _flip_byte(checkpoints / f"step_{step:08d}" / TENSORS_FILE)
    (checkpoints / "step_00000002" / MANIFEST_FILE).unlink()
    service, _ = make_service(tmp_path, parts=make_parts(seed=7))
    with pytest.raises(CheckpointError) as info:
        service.resume("auto")
    message = str(info.value)
    assert "none is usable" in message
    assert "step_00000001: sha256 mismatch" in message
    assert "step_00000002: missing MANIFEST.json" in message
    assert "step_00000003: sha256 mismatch" in message


def test_only_temporaries_means_a_fresh_start(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_00000001-abcdef01").mkdir(parents=True)
    service, _ = make_service(tmp_path)
    assert service.resume("auto") is None
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ---------------------------------------------------------------------- retention & failures


def test_retention_keeps_last_n_plus_milestones_and_latest_names_the_newest(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    service, parts = make_service(tmp_path, keep_last=3, keep_every_steps=4)
    service.resume("auto")
    run_steps(service, parts, 0, 11)
    service.close()
    assert saved(tmp_path) == ["step_00000004", "step_00000008", "step_00000009", "step_00000010", "step_00000011"]
    assert (tmp_path / "checkpoints" / LATEST_FILE).read_text().strip() == "step_00000011"
    assert (tmp_path / "checkpoints" / "notes.txt").read_text() == "mine"


def test_async_retention(tmp_path):
    service, parts = make_service(tmp_path, keep_last=2, async_write=True)
    service.resume("auto")
    run_steps(service, parts, 0, 6)
    service.close()
    assert saved(tmp_path) == ["step_00000005", "step_00000006"]
    assert (tmp_path / "checkpoints" / LATEST_FILE).read_text().strip() == "step_00000006"


def test_failing_write_keeps_older_checkpoints_and_training_goes_on(tmp_path, monkeypatch, caplog):
    service, parts = make_service(tmp_path)
    service.resume("auto")
    run_steps(service, parts, 0, 2)

    with monkeypatch.context() as patch:
        full_disk(patch, TENSORS_FILE)
        train_step(parts)
        with caplog.at_level(logging.ERROR):
            assert service.maybe_save(3) is None
        assert "FAILED" in caplog.text and "No space left" in caplog.text
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
            LATEST_FILE, "step_00000001", "step_00000002"]
        assert all(service.store.verify(p) == [] for p in service.store.list_checkpoints())
        with pytest.raises(CheckpointError, match="end checkpoint at step 3"):
            service.save_now(3, "end")

    run_steps(service, parts, 3, 4)  # the disk has room again: saving works
    assert saved(tmp_path)[-1] == "step_00000004"
    assert service.resume("auto").step == 4


def test_failing_async_write_is_reported(tmp_path, monkeypatch, caplog):
    service, parts = make_service(tmp_path, async_write=True)
    service.resume("auto")
    run_steps(service, parts, 0, 1)
    assert service.wait() is None
    full_disk(monkeypatch, TENSORS_FILE)
    train_step(parts)
    with caplog.at_level(logging.ERROR):
        service.maybe_save(2)
        error = service.wait()
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert "Background checkpoint write failed" in caplog.text
    with pytest.raises(CheckpointError, match="last background checkpoint write failed"):
        service.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST_FILE, "step_00000001"]


Usage = namedtuple("Usage", "total used free")


def test_low_disk_space_skips_the_save_with_a_warning(tmp_path, monkeypatch, caplog):
    service, parts = make_service(tmp_path)
    service.resume("auto")
    run_steps(service, parts, 0, 1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100, 100, 0))
    train_step(parts)
    with caplog.at_level(logging.WARNING):
        assert service.maybe_save(2) is None
    assert "SKIPPING the checkpoint at step 2" in caplog.text
    assert saved(tmp_path) == ["step_00000001"]
    run_steps(service, parts, 2, 3)  # training goes on, saves keep being attempted
    assert saved(tmp_path) == ["step_00000001"]


def test_low_disk_space_prunes_what_retention_allows_first(tmp_path, monkeypatch, caplog):
    service, parts = make_service(tmp_path, keep_last=2)
    service.resume("auto")
    run_steps(service, parts, 0, 2)
    checkpoints = tmp_path / "checkpoints"

    def usage(path):  # room for one more only once a checkpoint has gone
        count = len(saved(tmp_path))
        return Usage(10**9, 0, 10**9 if count < 2 else 0)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    train_step(parts)
    with caplog.at_level(logging.WARNING):
        assert service.maybe_save(3) is not None
    assert "removed checkpoint step 1 early" in caplog.text
    assert saved(tmp_path) == ["step_00000002", "step_00000003"]
    assert (checkpoints / LATEST_FILE).read_text().strip() == "step_00000003"


# ---------------------------------------------------------------------- modes & identity


def test_resume_never_refuses_a_folder_with_checkpoints(tmp_path):
    service, _ = make_service(tmp_path / "fresh")
    assert service.resume("never") is None
    _three_checkpoints(tmp_path / "used")
    service, _ = make_service(tmp_path / "used")
    with pytest.raises(CheckpointError, match="Choose another run_name"):
        service.resume("never")


def test_identity_change_of_the_model_is_refused_naming_the_keys(tmp_path):
    _three_checkpoints(tmp_path)
    changed = {**IDENTITY, "model.hidden": 8, "adapter.kind": "lora"}
    parts = make_parts(seed=7)
    before = parts["model"].weight.detach().clone()
    service, _ = make_service(tmp_path, parts=parts, identity=changed)
    with pytest.raises(CheckpointError) as info:
        service.resume("auto")
    message = str(info.value)
    assert "model.hidden: checkpoint 4 -> now 8" in message
    assert "adapter.kind: checkpoint 'so8' -> now 'lora'" in message
    assert torch.equal(parts["model"].weight, before)  # nothing was loaded


def test_other_identity_changes_are_accepted_with_a_warning(tmp_path, caplog):
    _three_checkpoints(tmp_path)
    changed = {**IDENTITY, "ppo.lr": 0.02, "reward.terms.format.weight": 0.5}
    service, _ = make_service(tmp_path, identity=changed)
    with caplog.at_level(logging.WARNING):
        result = service.resume("auto")
    assert result.step == 3
    assert result.changed_keys == ["ppo.lr", "reward.terms.format.weight"]
    assert "ppo.lr: checkpoint 0.01 -> now 0.02" in caplog.text


def test_resume_from_an_explicit_path_into_a_new_run_dir(tmp_path):
    _three_checkpoints(tmp_path / "old")
    source = tmp_path / "old" / "checkpoints" / "step_00000002"
    service, parts = make_service(tmp_path / "new", parts=make_parts(seed=7))
    result = service.resume(str(source))
    assert result.step == 2 and result.path == source and parts["counter"].steps == 2
    run_steps(service, parts, 2, 3)
    assert saved(tmp_path / "new") == ["step_00000003"]

    service, parts = make_service(tmp_path / "newer", parts=make_parts(seed=7))
    assert service.resume(tmp_path / "old").step == 3  # a run folder: its newest usable one


def test_explicit_path_must_be_valid(tmp_path):
    checkpoints = _three_checkpoints(tmp_path / "old")
    _flip_byte(checkpoints / "step_00000003" / TENSORS_FILE)
    service, _ = make_service(tmp_path / "new")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        service.resume(str(checkpoints / "step_00000003"))
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        service.resume(str(tmp_path / "nowhere"))


def test_a_part_missing_from_the_checkpoint_is_refused(tmp_path):
    _three_checkpoints(tmp_path)
    parts = {**make_parts(), "value_head": torch.nn.Linear(3, 1)}
    service = CheckpointService(tmp_path, make_cfg(), parts, IDENTITY)
    with pytest.raises(CheckpointError, match="does not cover \\['value_head'\\]"):
        service.resume("auto")


# ---------------------------------------------------------------------- forks (resume=<path>)


def test_a_fork_seeds_a_fresh_folder_then_continues_from_its_own_checkpoints(tmp_path):
    source_root = _three_checkpoints(tmp_path / "old")
    source = source_root / "step_00000002"
    service, parts = make_service(tmp_path / "fork", parts=make_parts(seed=7))
    assert service.resume(str(source)).path == source
    run_steps(service, parts, 2, 5)
    assert saved(tmp_path / "fork") == [f"step_0000000{i}" for i in (3, 4, 5)]
    manifest = json.loads((tmp_path / "fork" / "checkpoints" / "step_00000005" / MANIFEST_FILE).read_text())
    assert manifest["forked_from"] == str(source.resolve())

    # The same command again (a requeued job): the fork's own newest, not the source again.
    service, parts = make_service(tmp_path / "fork", parts=make_parts(seed=7))
    result = service.resume(str(source))
    assert result.step == 5 and parts["counter"].steps == 5
    # resume=auto continues the fork too, and keeps recording where it came from.
    service, parts = make_service(tmp_path / "fork", parts=make_parts(seed=7))
    service.resume("auto")
    run_steps(service, parts, 5, 6)
    manifest = json.loads((tmp_path / "fork" / "checkpoints" / "step_00000006" / MANIFEST_FILE).read_text())
    assert manifest["forked_from"] == str(source.resolve())
    # The source run was only read.
    assert saved(tmp_path / "old") == ["step_00000001", "step_00000002", "step_00000003"]


def test_a_fork_into_a_folder_with_another_history_is_refused(tmp_path):
    source = _three_checkpoints(tmp_path / "old") / "step_00000002"
    _three_checkpoints(tmp_path / "other")
    before = sorted(p.name for p in (tmp_path / "other" / "checkpoints").iterdir())
    service, _ = make_service(tmp_path / "other", parts=make_parts(seed=7))
    with pytest.raises(CheckpointError, match="already holds another history"):
        service.resume(str(source))
    assert sorted(p.name for p in (tmp_path / "other" / "checkpoints").iterdir()) == before
    # The run's own checkpoint folder named as the source is the same refusal: it is not a fork.
    service, _ = make_service(tmp_path / "old", parts=make_parts(seed=7))
    with pytest.raises(CheckpointError, match="already holds another history"):
        service.resume(str(source))
