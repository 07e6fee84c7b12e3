"""Fault injection: kill -9 inside every phase of a save, a full disk (or a read-only folder) at
every write site, a checkpoint folder deleted under a live run, the wall clock jumping.

The pause points and failing sites are those of so8t.run.faults, switched on by environment
variables; the CLI tests run the real ``python -m so8t.train``. A bounded version of what
``benchmarks/soak.py`` does at length.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from so8t.checkpoint import CheckpointStore
from so8t.run.faults import FAIL_SITES, PAUSE_POINTS
from so8t.run.folder_manifest import verify_folder
from tests.test_checkpoint_service import make_parts, make_service, run_steps, saved

pytestmark = pytest.mark.slow

TIMEOUT = 180
EXIT_CHECKPOINTING = 74

CHILD = textwrap.dedent(
    """
    import sys
    from tests.test_checkpoint_service import make_service, run_steps
    service, parts = make_service(sys.argv[1])
    service.resume("auto")
    run_steps(service, parts, 0, 3)   # saves at 1, 2, 3; the pause is in the second one
    print("not paused", flush=True)
    """
)

# Where a crash inside the second save leaves resume: before the rename the new folder is a
# temporary one (removed), from the rename on it is committed.
EXPECTED_STEP = {point: (1 if PAUSE_POINTS.index(point) < PAUSE_POINTS.index("save.renamed") else 2)
                 for point in PAUSE_POINTS}


@pytest.mark.parametrize("point", PAUSE_POINTS)
def test_kill_9_inside_every_phase_of_a_save(tmp_path, point):
    marker = tmp_path / "paused"
    env = dict(os.environ, SO8T_PAUSE_AT=f"{point}@2", SO8T_PAUSE_FILE=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "run")], env=env,
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None, f"the child ended without pausing at {point}: {proc.stdout.read()}"
            assert time.monotonic() < deadline, f"timed out waiting for {point}"
            time.sleep(0.02)
        assert marker.read_text() == point
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()

    service, parts = make_service(tmp_path / "run", parts=make_parts(seed=9))
    result = service.resume("auto")
    assert result.step == EXPECTED_STEP[point] == parts["counter"].steps
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    assert all(store.verify(p) == [] for p in store.list_checkpoints())
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]  # cleaned up
    run_steps(service, parts, result.step, 4)  # and saving goes on
    assert saved(tmp_path / "run")[-1] == "step_00000004"


def test_a_checkpoint_folder_deleted_under_a_live_run_is_recreated(tmp_path):
    service, parts = make_service(tmp_path, keep_last=2)
    service.resume("auto")
    run_steps(service, parts, 0, 2)
    shutil.rmtree(tmp_path / "checkpoints")
    run_steps(service, parts, 2, 4)
    assert saved(tmp_path) == ["step_00000003", "step_00000004"]
    service, parts = make_service(tmp_path, parts=make_parts(seed=9))
    assert service.resume("auto").step == 4


def test_the_wall_clock_jumping_changes_neither_cadence_nor_resume_order(tmp_path, monkeypatch):
    service, parts = make_service(tmp_path, every_steps=1)
    service.resume("auto")
    run_steps(service, parts, 0, 2)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 10 * 365 * 86400)  # ten years back
    run_steps(service, parts, 2, 3)
    monkeypatch.setattr(time, "time", lambda: real() + 10 * 365 * 86400)  # and forward
    run_steps(service, parts, 3, 4)
    monkeypatch.setattr(time, "time", lambda: real() - 20 * 365 * 86400)
    assert saved(tmp_path)[-1] == "step_00000004"
    service, parts = make_service(tmp_path, parts=make_parts(seed=9))
    assert service.resume("auto").step == 4  # not the one that claims to be newest by its clock


# ---------------------------------------------------------------------- the CLI under failing writes


BASE = ("output.progress_bars=false", "run_name=faults", "max_steps=4", "checkpoint=step", "checkpoint.every_steps=1",
        "checkpoint.max_failed_saves=2", "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1")


def train(cwd: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "so8t.train", *BASE, *overrides], cwd=cwd,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)


def _run(cwd: Path) -> Path:
    return cwd / "outputs" / "default" / "runs" / "faults"


def _session(cwd: Path) -> dict:
    return json.loads((_run(cwd) / "session.json").read_text())


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS"])
def test_every_checkpoint_write_failing_stops_with_74_and_the_same_command_recovers(tmp_path, errno_name):
    # Read-only is simulated with EROFS (the tests run as root, for whom chmod does not bite).
    sites = "checkpoint.tensors,checkpoint.state,checkpoint.manifest,final" if errno_name == "EROFS" else \
        "checkpoint.tensors@3"
    result = train(tmp_path, env={"SO8T_FAIL_AT": sites, "SO8T_FAIL_ERRNO": errno_name})
    assert result.returncode == EXIT_CHECKPOINTING, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    assert "did not commit" in result.stdout and "injected at checkpoint." in result.stdout
    session = _session(tmp_path)
    assert session["status"] == "failed" and session["attempts"][-1]["exit_code"] == EXIT_CHECKPOINTING
    assert session["failed_saves"] >= 2
    ok = train(tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert verify_folder(_run(tmp_path) / "final") == []
    assert _session(tmp_path)["status"] == "completed"


@pytest.mark.parametrize("site, code", [
    ("checkpoint.latest", 0),  # a hint: the checkpoints commit, resume orders them itself
    ("session", 0),            # the story of the run: logged, the run goes on
    ("metrics", 0),            # rows kept and retried; logged
    ("final", EXIT_CHECKPOINTING),
], ids=["latest", "session", "metrics", "final"])
def test_a_full_disk_at_each_other_write_site(tmp_path, site, code):
    result = train(tmp_path, env={"SO8T_FAIL_AT": site})
    assert result.returncode == code, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    assert "injected at " + site in result.stdout  # reported, not swallowed
    run = _run(tmp_path)
    store = CheckpointStore(run / "checkpoints")
    assert [p.name for p in store.list_checkpoints()][-1] == "step_00000004"
    if code != 0:  # the same command, the disk has room again, completes the run
        again = train(tmp_path)
        assert again.returncode == 0, again.stdout[-3000:]
    assert verify_folder(run / "final") == []
    if site == "session":  # every write of it failed; the run itself completed
        assert not (run / "session.json").exists()
    else:
        assert _session(tmp_path)["status"] == "completed"


def test_the_fault_sites_are_all_exercised_by_this_module():
    covered = {"checkpoint.tensors", "checkpoint.state", "checkpoint.manifest", "checkpoint.latest", "session",
               "metrics", "final"}
    assert covered == set(FAIL_SITES)
