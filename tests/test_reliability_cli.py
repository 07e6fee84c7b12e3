"""Reliability through the real CLI: forks get their own folder, a stop stops even when its save
fails, final/ is verified before a run counts as completed, and final/ is no way in."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from so8t.run.folder_manifest import verify_folder

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name == "nt", reason="POSIX signals")]

TIMEOUT = 300
ARGS = ("output.progress_bars=false", "checkpoint=step", "checkpoint.every_steps=2", "ppo.rollout_batch_size=8",
        "ppo.ppo_epochs=1")


def train(cwd: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "so8t.train", *ARGS, *overrides], cwd=cwd,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:]
    return result


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock.os"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reliability")
    ok(train(cwd, "run_name=base", "max_steps=4"))
    return cwd


def test_resume_from_a_path_forks_into_its_own_folder_and_continues_there(base):
    runs = base / "outputs" / "default" / "runs"
    source = runs / "base" / "checkpoints" / "step_00000002"
    before = tree_digest(runs / "base")
    # Without run_name, as the README shows it: the fork's name comes from its source.
    first = ok(train(base, "max_steps=3", f"resume={source}"))
    forks = [p for p in runs.iterdir() if "fork-step_00000002-" in p.name]
    assert len(forks) == 1, sorted(p.name for p in runs.iterdir())
    fork = forks[0]
    assert "resumed from step 2" in first.stdout
    assert tree_digest(runs / "base") == before  # the source run is untouched
    # The same command again, longer: it continues from the fork's own step 3, not the source.
    again = ok(train(base, "max_steps=4", f"resume={source}"))
    assert "resumed from step 3" in again.stdout and str(fork) in again.stdout
    assert tree_digest(runs / "base") == before


def test_a_run_is_completed_only_with_a_final_folder_that_verifies(base, tmp_path):
    import shutil

    cwd = tmp_path
    shutil.copytree(base / "outputs", cwd / "outputs")
    run = cwd / "outputs" / "default" / "runs" / "base"
    assert verify_folder(run / "final") == []
    skipped = ok(train(cwd, "run_name=base", "max_steps=4"))
    assert "(session.json); skipped" in skipped.stdout
    adapter = run / "final" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)  # damaged, same size
    again = ok(train(cwd, "run_name=base", "max_steps=4"))
    assert "final/ does not verify" in again.stdout and "exporting final/ again" in again.stdout
    assert verify_folder(run / "final") == []


def test_load_policy_ignores_trust_remote_code_and_downloads_asked_for_by_policy_json(base, monkeypatch, tmp_path):
    import shutil

    import so8t
    import so8t.model.loading as loading

    final = tmp_path / "final"
    shutil.copytree(base / "outputs" / "default" / "runs" / "base" / "final", final)
    meta = json.loads((final / "policy.json").read_text())
    meta["model"].update(trust_remote_code=True, local_files_only=False, kind="hub", path="someone/else")
    (final / "policy.json").write_text(json.dumps(meta))
    seen = {}

    class Stop(Exception):
        pass

    def load_base_model(model_cfg, **kwargs):
        seen.update(trust_remote_code=model_cfg.trust_remote_code, local_files_only=model_cfg.local_files_only)
        raise Stop

    monkeypatch.setattr(loading, "load_base_model", load_base_model)
    with pytest.raises(Stop):
        so8t.load_policy(final)
    assert seen == {"trust_remote_code": False, "local_files_only": True}
    with pytest.raises(Stop):
        so8t.load_policy(final, trust_remote_code=True, local_files_only=False)  # the caller may
    assert seen == {"trust_remote_code": True, "local_files_only": False}


def _wait_for_rows(run: Path, proc: subprocess.Popen, rows: int = 1) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if len((run / "metrics.jsonl").read_text().splitlines()) >= rows:
                return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before training"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_signal_whose_save_fails_still_exits_with_the_signal_code(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", SO8T_FAIL_AT="checkpoint.tensors")
    out = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "so8t.train", "output.progress_bars=false", "run_name=sig",
                             "max_steps=500", "checkpoint=step", "checkpoint.every_steps=400",
                             "ppo.rollout_batch_size=64"], cwd=tmp_path, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        _wait_for_rows(tmp_path / "outputs" / "default" / "runs" / "sig", proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    text = (tmp_path / "out.log").read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "stopping anyway" in text and "Traceback" not in text
    session = json.loads((tmp_path / "outputs" / "default" / "runs" / "sig" / "session.json").read_text())
    assert session["status"] == "interrupted" and session["attempts"][-1]["exit_code"] == 143
    assert session["failed_saves"] >= 1


def test_a_deadline_whose_save_fails_exits_75_and_ends_the_sweep(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "so8t.train", "-m", "output.progress_bars=false", "max_steps=50",
         "max_wall_seconds=1", "checkpoint=step", "checkpoint.every_steps=40", "ppo.rollout_batch_size=8",
         "ppo.ppo_epochs=1", "seed=1,2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=TIMEOUT, env=dict(os.environ, PYTHONUNBUFFERED="1", SO8T_FAIL_AT="checkpoint.tensors"))
    assert result.returncode == 75, result.stdout[-3000:]
    assert "stopping anyway" in result.stdout and "Traceback" not in result.stdout
    jobs = sorted(p.parent.name for p in (tmp_path / "outputs").rglob("session.json"))
    assert len(jobs) == 1 and jobs[0].endswith("seed=1"), jobs  # the stop ended the sweep: job 2 never started


def test_a_stop_right_after_a_cadence_save_does_not_write_the_step_twice(tmp_path, monkeypatch):
    from so8t.checkpoint.store import CheckpointStore
    from so8t.recipe import TrainingRecipe
    from so8t.run.clock import Deadline
    from so8t.run.session import SessionFile
    from tests.test_checkpoint_service import make_service, run_steps

    service, parts = make_service(tmp_path, every_steps=2, async_write=True)
    service.resume("auto")
    run_steps(service, parts, 0, 2)  # the cadence saves step 2 in the background
    session = SessionFile(tmp_path)
    session.start_attempt(10, None, None)
    calls = []
    real = CheckpointStore.save
    monkeypatch.setattr(CheckpointStore, "save", lambda self, step, *a, **k: calls.append(step) or real(
        self, step, *a, **k))

    class Trainer:
        counters = type("C", (), {"step": 2, "training_time": 0.0})()

    recipe = TrainingRecipe(None, tmp_path)
    recipe.checkpoints, recipe.session, recipe.trainer, recipe.deadline = service, session, Trainer, Deadline(None, 0.0)
    recipe._stop_save("signal")
    recipe._stop_save("deadline")
    assert calls == []
    assert json.loads((tmp_path / "session.json").read_text())["last_checkpoint"]["step"] == 2


def test_a_rival_refused_with_exit_3_leaves_the_live_runs_hydra_record_and_log_alone(tmp_path):
    run = tmp_path / "outputs" / "default" / "runs" / "live"
    out = open(tmp_path / "holder.log", "w")
    holder = subprocess.Popen([sys.executable, "-m", "so8t.train", "output.progress_bars=false", "run_name=live",
                               "max_steps=8", "ppo.rollout_batch_size=8"], cwd=tmp_path, stdout=out,
                              stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _wait_for_rows(run, holder)
        holder.send_signal(signal.SIGSTOP)  # surely alive, and holding the lock, while the rival starts
        hydra_before = tree_digest(run / ".hydra")
        log_before = (run / "train.log").read_bytes()
        # Another neutral override: Hydra would record it in .hydra/overrides.yaml.
        rival = train(tmp_path, "run_name=live", "max_steps=8", "hardware.num_threads=1")
        assert rival.returncode == 3, rival.stdout[-3000:]
        assert "is in use by pid" in rival.stdout
        assert tree_digest(run / ".hydra") == hydra_before
        assert (run / "train.log").read_bytes() == log_before
        assert not (run / ".hydra-incoming").exists()
    finally:
        holder.send_signal(signal.SIGCONT)
        code = holder.wait(TIMEOUT)
        out.close()
    assert code == 0, (tmp_path / "holder.log").read_text()[-3000:]
    assert "is in use by pid" not in (run / "train.log").read_text()
